import torch

from noodle.config import ModelConfig
from noodle.model import NoodleModel, apply_rotary, rotary_tables

CONFIG = ModelConfig(
    n_layers=2, emb_dim=32, n_heads=2, head_dim=8, hidden_dim=64, ctx_len=16, vocab_size=256
)


def model(seed: int = 0) -> NoodleModel:
    torch.manual_seed(seed)
    return NoodleModel(CONFIG).eval()


def test_logits_shape_and_head_dim_independent_of_emb_dim():
    idx = torch.randint(0, 256, (3, 10))
    assert model()(idx).shape == (3, 10, 256)
    # n_heads * head_dim (16) differs from emb_dim (32): the projections handle it.
    assert model().blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32)


def test_attention_is_causal():
    net = model()
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    assert torch.allclose(net(idx)[0, :8], net(changed)[0, :8], atol=1e-6)
    assert not torch.allclose(net(idx)[0, 8:], net(changed)[0, 8:])


def test_dropout_is_off_in_eval_and_on_in_training():
    net = NoodleModel(ModelConfig(**{**CONFIG.to_dict(), "dropout": 0.5}))
    idx = torch.randint(0, 256, (2, 8))
    net.eval()
    assert torch.equal(net(idx), net(idx))
    net.train()
    assert not torch.equal(net(idx), net(idx))


def test_rotary_embedding_rotates_pairs_half_a_head_apart():
    cos, sin = rotary_tables(head_dim=4, length=3, base=10000.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])
    out = apply_rotary(x, cos[2], sin[2])
    # rotate-half layout: element 0 pairs with element 2, rotated by angle = position.
    cos2, sin2 = torch.cos(torch.tensor(2.0)), torch.sin(torch.tensor(2.0))
    assert torch.allclose(out, torch.tensor([cos2, 0, sin2, 0]))
    # ...and element 2 turns the other way: (x0, x2) -> (x0 cos - x2 sin, x2 cos + x0 sin).
    out = apply_rotary(torch.tensor([0.0, 0.0, 1.0, 0.0]), cos[2], sin[2])
    assert torch.allclose(out, torch.tensor([-sin2, 0, cos2, 0]))


def test_loss_ignores_masked_targets_and_starts_near_uniform():
    net = model()
    idx = torch.randint(0, 256, (2, 16))
    targets = idx.clone()
    assert abs(net(idx, targets).item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    masked = targets.clone()
    masked[:, :8] = -100
    logits = net(idx)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 8:].reshape(-1, 256), targets[:, 8:].reshape(-1)
    )
    assert torch.allclose(net(idx, masked), expected, atol=1e-6)
