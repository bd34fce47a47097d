"""Calibration text sampled from the model (seeded, shaped, cached) and the bundled mixed corpus."""

import torch
import tiny_models as tm

from hfcompress.calibration import bundled_text, get_calibration_batches, load_texts
from hfcompress.calibration.generate import cached_generated_ids, generate_calibration_ids


def _model_and_tokenizer():
    tok = tm.char_tokenizer()
    tok.eos_token = "\n"  # the char tokenizer has no special tokens: start from "\n"
    return tm.llama_gqa().eval(), tok


def test_generated_ids_are_seeded_shaped_and_sampled():
    model, tok = _model_and_tokenizer()
    a = generate_calibration_ids(model, tok, n_samples=5, seq_len=12, seed=3, batch_size=2)
    b = generate_calibration_ids(model, tok, n_samples=5, seq_len=12, seed=3, batch_size=2)
    c = generate_calibration_ids(model, tok, n_samples=5, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 5  # sampled, not one greedy continuation repeated
    # usable as calibration token ids as they are
    batches = get_calibration_batches(None, a, n_samples=4, seq_len=12, batch_size=2)
    assert [tuple(x.shape) for x in batches] == [(2, 12), (2, 12)]


def test_generated_ids_cache_roundtrip_and_damaged_cache(tmp_path):
    model, tok = _model_and_tokenizer()
    ids = cached_generated_ids(model, tok, 3, 8, str(tmp_path), seed=1)
    (path,) = tmp_path.glob("generated-n3-s8-seed1.safetensors")
    assert torch.equal(cached_generated_ids(None, None, 3, 8, str(tmp_path), seed=1), ids)  # read, no model needed
    path.write_bytes(b"not a safetensors file")
    assert torch.equal(cached_generated_ids(model, tok, 3, 8, str(tmp_path), seed=1), ids)  # regenerated
    assert not list(tmp_path.glob("*.tmp*"))


def test_mixed_calibration_corpus_interleaves_its_sources():
    (text,) = load_texts("mixed")
    # the default calibration set (dataset=None) is the mixed corpus, not Shakespeare alone
    assert text == bundled_text("mixed") == load_texts(None)[0] == bundled_text("calibration")
    assert text != bundled_text("shakespeare") == load_texts("shakespeare")[0]
    # three kinds of text, interleaved: each appears in the first and in the last fifth
    for part in (text[: len(text) // 5], text[-len(text) // 5:]):
        assert "MACBETH" in part or "BRUTUS" in part or "OTHELLO" in part or "[Exit" in part
        assert "```js" in part or "const " in part
        assert "Rust" in part or "rust-lang" in part
