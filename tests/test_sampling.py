"""kvtier.generate's sampling and streamer, as model.generate has them."""

from __future__ import annotations

import pytest
import torch
import transformers

import kvtier

IDS = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_sampling_draws_what_model_generate_draws(tiny_pair):
    ref, model = tiny_pair("llama")
    with torch.inference_mode():
        torch.manual_seed(3)
        expected = ref.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=16, eos_token_id=-1,
                                pad_token_id=0, **SAMPLING)
    torch.manual_seed(3)  # without a seed, both draw from torch's global generator
    out = kvtier.generate(model, IDS, method="offload", max_new_tokens=16, eos_token_id=-1, **SAMPLING)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("method", ["full", "specache"])
def test_a_seed_makes_draws_reproducible(tiny, method):
    model = tiny("llama")
    opts = dict(group_size=8, residual=8, topk=8) if method == "specache" else {}
    runs = [kvtier.generate(model, IDS, method=method, max_new_tokens=20, eos_token_id=-1, seed=seed,
                            **SAMPLING, **opts) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = kvtier.generate(model, IDS, method=method, max_new_tokens=20, eos_token_id=-1, **opts)
    assert not torch.equal(runs[0], greedy)


@pytest.mark.parametrize("method", ["full", "specache"])
def test_streamer_gets_the_prompt_then_each_token(tiny, method):
    model = tiny("llama")
    opts = dict(group_size=8, residual=8, topk=8) if method == "specache" else {}
    streamer = Recorder()
    out = kvtier.generate(model, IDS, method=method, max_new_tokens=7, eos_token_id=-1, streamer=streamer, **opts)
    assert torch.equal(streamer.puts[0], IDS) and streamer.ended == 1
    assert torch.cat([p.view(1, -1) for p in streamer.puts[1:]], 1).tolist() == out[:, IDS.shape[1]:].tolist()


def test_text_streamer_prints_the_answer(embedded, capsys):
    model, tokenizer = embedded
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    streamer = transformers.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = kvtier.generate(model, ids, method="full", max_new_tokens=8, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=0), "temperature must be a number > 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_p=0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(seed="abc"), "seed must be an int, got 'abc'"),
    (dict(seed=1.5), "seed must be an int, got 1.5"),
])
def test_bad_sampling_values_are_refused(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        kvtier.generate(tiny("llama"), IDS, max_new_tokens=2, do_sample=True, **bad)


@pytest.mark.parametrize("given, match", [
    (dict(temperature=0.7), "temperature=0.7 is for sampling: add do_sample=True"),
    (dict(top_k=5, top_p=0.9, seed=1), "top_k=5, top_p=0.9, seed=1 are for sampling"),
])
def test_sampling_values_without_do_sample_are_refused(tiny, given, match):
    # they were ignored: the answer came out greedy
    with pytest.raises(ValueError, match=match):
        kvtier.generate(tiny("llama"), IDS, max_new_tokens=2, **given)
