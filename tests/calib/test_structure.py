"""Layer roles from one traced call, on models whose names share nothing with diffusers'."""
import torch
from torch import nn

from diffq.calib.structure import trace_structure
from tests.unseen_models import edm_calls, edm_net


def test_roles_of_an_edm_unit_net_come_from_structure_not_names():
    net = edm_net()
    st = trace_structure(net, *edm_calls(0, per_sigma=1)[0])
    assert st.with_role("input") == ["stem"]
    assert st.with_role("output") == ["head"]
    assert set(st.with_role("embedding")) == {"noise_map", "label_map", "emb_mlp"}
    units = ("enc.0", "enc.1", "mid", "dec.0", "dec.1")
    assert set(st.with_role("modulation")) == {f"{u}.gain" for u in units}
    # the decoder units read cat(h, skip): their first conv (after the norm) and projection
    assert st.segments == {"dec.0.c0": [64, 64], "dec.0.proj": [64, 64],
                           "dec.1.c0": [64, 32], "dec.1.proj": [64, 32]}
    assert st.describe("mid.qkv") == "body"


class Joint(nn.Module):
    """A DiT-like block: adaLN modulation from the timestep, a text stream and a joint
    attention over cat(text, image) tokens (a concat along tokens, not features)."""

    def __init__(self, d=16):
        super().__init__()
        self.t_mlp, self.ada = nn.Linear(8, d), nn.Linear(d, 2 * d)
        self.patch, self.txt = nn.Linear(4, d), nn.Linear(12, d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        emb = self.t_mlp(torch.cat([timestep[:, None].float().sin()] * 8, dim=1))
        shift, scale = self.ada(torch.nn.functional.silu(emb)).chunk(2, dim=1)
        x = self.patch(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        tokens = torch.cat([self.txt(encoder_hidden_states), x], dim=1)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        return self.out(a[:, encoder_hidden_states.shape[1]:])


def test_dit_roles_and_no_skip_split_for_a_token_concat(gen):
    m = Joint()
    st = trace_structure(m, (torch.randn(2, 6, 4, generator=gen), torch.tensor([3.0, 3.0]),
                             torch.randn(2, 5, 12, generator=gen)))
    assert st.with_role("input") == ["patch"] and st.with_role("output") == ["out"]
    assert st.with_role("embedding") == ["t_mlp"] and st.with_role("modulation") == ["ada"]
    assert st.with_role("context") == ["txt"]
    assert st.segments == {}  # text and image tokens join along the sequence, not the features
