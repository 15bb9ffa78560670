from noodle.cli import main

main()
