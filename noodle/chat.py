"""`noodle chat`: talk with a model on a terminal, line by line through a pipe, or once.

Replies are streamed to stdout as they are generated; the banner and the `> ` prompt go to
stderr, so redirecting stdout captures the replies and nothing else.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.console import Console

from noodle.device import describe_device, select_device
from noodle.inference import Session, load_for_inference
from noodle.instructions import format_prompt
from noodle.precision import prepare_for_inference, select_inference_dtype, uses_packed_float16
from noodle.sampling import SamplingSettings
from noodle.tokenizer import TextTokenizer

BANNER = " ~(°◡°)~  Noodle"
REPLACEMENT_CHARACTER = "\ufffd"
# In a pipe every reply must stay on one line, so line breaks inside it become spaces.
ONE_LINE = str.maketrans({"\n": " ", "\r": " "})


@dataclass
class ChatOptions:
    model: str
    prompt: str | None = None
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 100
    seed: int | None = None
    backend: str | None = None
    dtype: str = "auto"
    compile_decode: bool | None = None  # None: on CUDA only


class TextStream:
    """Turns token ids into text as they arrive, emitting only complete characters.

    A byte-level token can end in the middle of a multi-byte character; decoding it alone
    gives a U+FFFD. The pending tokens are decoded together and a trailing U+FFFD is held
    back until the next token completes the character (or the reply ends).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self.emitted = 0  # characters of decode(pending) already returned

    def push(self, token: int) -> str:
        """The new text that `token` completes (possibly empty)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        complete = not text.endswith(REPLACEMENT_CHARACTER)
        stable = text if complete else text[:-1]
        new = stable[self.emitted :]
        if complete:
            # Everything so far is out: start afresh so decoding stays O(1) per token.
            self.pending, self.emitted = [], 0
        else:
            self.emitted = len(stable)
        return new

    def flush(self) -> str:
        """Whatever was held back, at the end of a reply."""
        text = self.tokenizer.decode(self.pending)[self.emitted :]
        self.pending, self.emitted = [], 0
        return text


@dataclass
class Conversation:
    """A loaded model's session and how a user's lines become its turns.

    A base model continues text: a line is its tokens, on a new line after the first turn.
    A fine-tuned model (model.json's training kind "finetune") reads a line as fine-tuning
    built its prompts (`instructions.format_prompt`), so its reply starts where a trained
    response starts; a later turn follows the end-of-text that ended each training example.
    """

    session: Session
    about: str  # model, size, device and precision, for the terminal's banner
    follows_instructions: bool

    def turn(self, line: str) -> list[int]:
        tokenizer, started = self.session.tokenizer, bool(self.session.history)
        if self.follows_instructions:
            ids = tokenizer.encode(format_prompt(line))
            return [tokenizer.eot_id, *ids] if started else ids
        ids = tokenizer.encode(f"\n{line}" if started else line)
        # An empty first turn starts the conversation at a document boundary.
        return ids if ids or started else [tokenizer.eot_id]


def open_session(options: ChatOptions) -> Conversation:
    """Load the model in its inference precision (refused beforehand if it cannot fit)."""
    device = select_device(options.backend)
    compile_decode = options.compile_decode
    if compile_decode is None:
        compile_decode = device.type == "cuda"
    dtype = select_inference_dtype(options.dtype, device, compile_decode)
    precision = str(dtype).removeprefix("torch.")
    if uses_packed_float16(dtype, device, compile_decode):
        precision = "float16 weights, float32 arithmetic"
    loaded = load_for_inference(
        options.model,
        "to chat",
        device,
        lambda warning: print(f"warning: {warning}", file=sys.stderr),
    )
    parameters = loaded.model.parameter_count()
    prepare_for_inference(loaded.model, dtype, compile_decode)
    session = Session(loaded.model, loaded.tokenizer, compile_decode)
    if compile_decode:
        session.warm_up(options.settings)
    description = (
        f"{loaded.metadata.get('preset', 'custom')} · "
        f"{parameters:,} parameters · {describe_device(device)} · {precision}"
    )
    training = loaded.metadata.get("training")
    finetuned = isinstance(training, dict) and training.get("kind") == "finetune"
    return Conversation(session, description, finetuned)


def reply(
    session: Session,
    ids: list[int],
    options: ChatOptions,
    generator: torch.Generator,
    write: Callable[[str], None],
) -> None:
    """Generate the answer to the turn `ids`, handing it to `write` piece by piece as it
    comes.

    On Ctrl-C the history is cut back to the text already shown: the token being shown
    when it came, and those of a character still incomplete, are discarded.
    """
    session.push(ids)
    shown = len(session.history)
    stream = TextStream(session.tokenizer)
    try:
        for token in session.sample(options.max_tokens, options.settings, generator):
            piece = stream.push(token)
            if piece:
                write(piece)
            if not stream.pending:
                shown = len(session.history)
    except KeyboardInterrupt:
        while len(session.history) > shown:
            session.discard_last()
        raise
    write(stream.flush())


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_stdout_one_line(text: str) -> None:
    write_stdout(text.translate(ONE_LINE))


def answer_once(
    conversation: Conversation, prompt: str, options: ChatOptions, generator: torch.Generator
) -> None:
    reply(conversation.session, conversation.turn(prompt), options, generator, write_stdout)
    write_stdout("\n")


def input_lines() -> Iterator[str]:
    """Standard input's lines, decoded; a line that is not valid UTF-8 is used with its bad
    bytes replaced (U+FFFD), and a warning."""
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            print(
                f"warning: input line {number}: invalid UTF-8 replaced with U+FFFD",
                file=sys.stderr,
                flush=True,
            )
            yield raw.decode("utf-8", errors="replace")


def answer_lines(
    conversation: Conversation, options: ChatOptions, generator: torch.Generator
) -> None:
    """Piped mode: every input line is a turn; every reply is one line of output."""
    for line in input_lines():
        turn = conversation.turn(line.strip())
        reply(conversation.session, turn, options, generator, write_stdout_one_line)
        write_stdout("\n")


def read_line(console: Console) -> str | None:
    """The next line typed at the `> ` prompt; None at end of input (Ctrl-D)."""
    while True:
        try:
            return console.input("[bold]> [/]")
        except KeyboardInterrupt:
            console.print()  # Ctrl-C at the prompt only clears the line
        except EOFError:
            console.print()
            return None


def converse(conversation: Conversation, options: ChatOptions, generator: torch.Generator) -> None:
    """Terminal mode: banner, `> ` prompt, streamed replies; Ctrl-C stops a reply."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    console = Console(stderr=True, highlight=False)
    console.print(f"\n[bold]{BANNER}[/]\n")
    console.print(f"[dim]{conversation.about}\nCtrl-C stops a reply, Ctrl-D exits.[/]\n")
    while (line := read_line(console)) is not None:
        if not line.strip():
            continue
        # Ctrl-C ends the reply; the next turn goes on from what was shown.
        with contextlib.suppress(KeyboardInterrupt):
            turn = conversation.turn(line.strip())
            reply(conversation.session, turn, options, generator, write_stdout)
        write_stdout("\n")


def chat(options: ChatOptions) -> None:
    conversation = open_session(options)
    generator = torch.Generator(device=conversation.session.device)
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(options.seed)
    if options.prompt is not None:
        answer_once(conversation, options.prompt, options, generator)
    elif sys.stdin.isatty():
        converse(conversation, options, generator)
    else:
        answer_lines(conversation, options, generator)
