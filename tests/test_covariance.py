"""C0 = E[k k^T]: the streamed second moments against brute force, determinism and the disk cache."""

import random
import shutil

import pytest
import torch

import fededit_core.memit.covariance as covariance
from fededit_core.memit.covariance import CovarianceStore, corpus_chunks, second_moments
from fededit_core.model.families import family_for
from tests.tiny import tiny_model_and_tokenizer

WORDS = (
    "the of and to in is was for on that with as by at from his her city river king music year team "
    "game house night light stone water garden"
).split()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDEDIT_CACHE", str(root))
    return root


def write_corpus(path, n_lines=60, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n_lines)]
    lines.insert(5, "")  # blank lines are skipped
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama():
    return tiny_model_and_tokenizer("llama", pad_token=True)


def brute_force_moments(model, chunks, layers):
    """Sum of k k^T (float64) over every token, one unpadded sequence at a time, full forward."""
    family = family_for(model)
    seen = {}
    handles = [
        model.get_submodule(family.edit_module_name(l)).register_forward_pre_hook(
            lambda module, args, l=l: seen.__setitem__(l, args[0].detach())
        )
        for l in layers
    ]
    sums = {l: torch.zeros(128, 128, dtype=torch.float64) for l in layers}
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
                for l in layers:
                    k = seen[l][0].double()
                    sums[l] += k.T @ k
    finally:
        for h in handles:
            h.remove()
    return sums, sum(len(c) for c in chunks)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_second_moments_equal_brute_force_with_padding(family):
    model, tok = tiny_model_and_tokenizer(family, pad_token=True)
    gen = torch.Generator().manual_seed(0)
    lengths = [17, 5, 23, 9, 1, 12, 30]  # batches of 3 hold chunks of different lengths: padding
    chunks = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    layers = [0, 2]
    sums, count = second_moments(model, layers, chunks, tok.pad_token_id, batch_size=3)
    expected, expected_count = brute_force_moments(model, chunks, layers)
    assert count == expected_count == sum(lengths)
    assert set(sums) == set(layers)
    for l in layers:
        assert sums[l].dtype == torch.float64 and tuple(sums[l].shape) == (128, 128)
        torch.testing.assert_close(sums[l], expected[l], rtol=1e-5, atol=1e-7)
    # the two layers really are different statistics
    assert not torch.allclose(sums[0], sums[2])
    # batching does not matter beyond float32 noise, nor does the pad id (the tokenizer may have none)
    sums_1, _ = second_moments(model, layers, chunks, None, batch_size=1)
    for l in layers:
        torch.testing.assert_close(sums_1[l], expected[l], rtol=1e-5, atol=1e-7)


def test_store_from_a_text_file_is_deterministic_and_cached(llama, tmp_path, cache, monkeypatch):
    model, tok = llama
    corpus = write_corpus(tmp_path / "corpus.txt")
    kwargs = dict(source=str(corpus), n_samples=8, seq_len=32, batch_size=3)

    first = CovarianceStore(model, tok, **kwargs).get_many([1, 2])
    files = sorted((cache / "covariance").glob("*.safetensors"))
    assert len(files) == 2

    # C0 is the uncentred mean of k k^T over the corpus tokens
    chunks, _ = corpus_chunks(model, tok, str(corpus), 8, 32)
    assert len(chunks) == 8 and all(len(c) == 32 for c in chunks)
    sums, count = second_moments(model, [1, 2], chunks, tok.pad_token_id, batch_size=3)
    for l in (1, 2):
        assert first[l].dtype == torch.float64 and tuple(first[l].shape) == (128, 128)
        torch.testing.assert_close(first[l], sums[l] / count, rtol=1e-12, atol=0)
        assert torch.equal(first[l], first[l].T)
        assert torch.linalg.eigvalsh(first[l]).min() > -1e-10

    # a fresh computation (cache emptied) gives the same bits
    shutil.rmtree(cache)
    second = CovarianceStore(model, tok, **kwargs).get_many([1, 2])
    for l in (1, 2):
        assert torch.equal(first[l], second[l])

    # with the cache present a new store reads it and computes nothing
    def refuse(*args, **kw):
        raise AssertionError("second_moments called although C0 is cached")

    monkeypatch.setattr(covariance, "second_moments", refuse)
    cached_store = CovarianceStore(model, tok, **kwargs)
    third = cached_store.get_many([1, 2])
    for l in (1, 2):
        assert torch.equal(first[l], third[l])
    assert torch.equal(cached_store.get(2), first[2])


def test_cache_key_follows_the_settings(llama, tmp_path, cache, monkeypatch):
    model, tok = llama
    corpus = write_corpus(tmp_path / "corpus.txt")
    calls = []
    real = covariance.second_moments
    monkeypatch.setattr(covariance, "second_moments", lambda *a, **k: calls.append(a[1]) or real(*a, **k))

    base = CovarianceStore(model, tok, source=str(corpus), n_samples=8, seq_len=32).get(1)
    assert len(calls) == 1
    fewer = CovarianceStore(model, tok, source=str(corpus), n_samples=4, seq_len=32).get(1)
    assert len(calls) == 2, "a different n_samples must not reuse the cached C0"
    assert not torch.equal(base, fewer)
    shorter = CovarianceStore(model, tok, source=str(corpus), n_samples=8, seq_len=16).get(1)
    assert len(calls) == 3, "a different seq_len must not reuse the cached C0"
    assert not torch.equal(base, shorter)
    other_model, _ = tiny_model_and_tokenizer("llama", seed=1, pad_token=True)
    CovarianceStore(other_model, tok, source=str(corpus), n_samples=8, seq_len=32).get(1)
    assert len(calls) == 4, "a different model must not reuse the cached C0"
    assert len(list((cache / "covariance").glob("*.safetensors"))) == 4
    # and the first settings again: from the cache
    again = CovarianceStore(model, tok, source=str(corpus), n_samples=8, seq_len=32).get(1)
    assert len(calls) == 4
    assert torch.equal(again, base)


def test_cache_notices_a_changed_corpus_file(llama, tmp_path, monkeypatch):
    model, tok = llama
    corpus = write_corpus(tmp_path / "corpus.txt", seed=0)
    before = CovarianceStore(model, tok, source=str(corpus), n_samples=8, seq_len=32).get(1)
    write_corpus(corpus, seed=1, n_lines=70)  # same path, other text
    after = CovarianceStore(model, tok, source=str(corpus), n_samples=8, seq_len=32).get(1)
    assert not torch.equal(before, after), "stale C0 served for a changed corpus file"


def test_self_source_is_deterministic(llama, cache):
    model, tok = llama
    kwargs = dict(source="self", n_samples=4, seq_len=12, batch_size=2)
    first = CovarianceStore(model, tok, **kwargs).get_many([0, 3])
    assert list((cache / "corpus").glob("self-*.json")), "the sampled corpus is cached"
    shutil.rmtree(cache)  # sample the corpus and compute C0 again from nothing
    second = CovarianceStore(model, tok, **kwargs).get_many([0, 3])
    for l in (0, 3):
        assert torch.isfinite(first[l]).all() and first[l].abs().sum() > 0
        assert torch.equal(first[l], second[l])
    # sampling depends on the seed
    reseeded = CovarianceStore(model, tok, seed=1, **kwargs).get(0)
    assert not torch.equal(reseeded, first[0])


def test_missing_corpus_file_is_a_clear_error(llama, tmp_path):
    model, tok = llama
    missing = tmp_path / "no-such-corpus.txt"
    store = CovarianceStore(model, tok, source=str(missing), n_samples=4, seq_len=16)
    with pytest.raises(FileNotFoundError, match="no-such-corpus.txt.*no such file"):
        store.get(1)


def test_empty_corpus_file_is_a_clear_error(llama, tmp_path):
    model, tok = llama
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        CovarianceStore(model, tok, source=str(empty), n_samples=4, seq_len=16).get(1)
