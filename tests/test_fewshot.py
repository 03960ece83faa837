"""fastvit.fewshot against a numpy ridge-regression reference, and the evaluate() runner on raw digit pixels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastvit import fewshot


def reference_scores(train_x, train_y, test_x, l2, num_classes):
    """big_vision's recipe in numpy: standardise with the training statistics, bias feature 100, 2·onehot−1
    targets, primal ridge solution with np.linalg.solve."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    def prep(x):
        return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    x = prep(train_x)
    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)
    return prep(test_x) @ w, w


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)], ids=["primal", "dual"])
@pytest.mark.parametrize("l2", [0.1, 10.0])
def test_lsr_matches_numpy(n, d, l2):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, d)) * 1.5
    train_y = np.arange(n) % 5
    test_y = rng.integers(0, 5, 200)
    train_x = centers[train_y] + rng.normal(size=(n, d)) * 2.0
    test_x = centers[test_y] + rng.normal(size=(200, d)) * 2.0
    scores, w_ref = reference_scores(train_x, train_y, test_x, l2, 5)
    acc_ref = float((scores.argmax(1) == test_y).mean())
    assert 0.3 < acc_ref < 1.0  # neither trivial nor perfect: the comparison can tell predictions apart
    assert fewshot.lsr_accuracy(train_x, train_y, test_x, test_y, l2=l2) == pytest.approx(acc_ref, abs=1e-12)
    w, _, _ = fewshot.lsr_weights(train_x, train_y, l2=l2, num_classes=5)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-7, atol=1e-9)


def test_lsr_weights_equal_augmented_lstsq():
    """Ridge as least squares: [X; sqrt(l2) I] W = [Y; 0] (np.linalg.lstsq), the dual branch included."""
    rng = np.random.default_rng(1)
    train_x, train_y = rng.normal(size=(8, 20)), np.arange(8) % 4
    l2 = 0.5
    w, mean, std = fewshot.lsr_weights(train_x, train_y, l2=l2)
    x = np.hstack([(train_x - mean.numpy()) / std.numpy(), np.full((8, 1), 100.0)])
    y = 2.0 * np.eye(4)[train_y] - 1.0
    a = np.vstack([x, np.sqrt(l2) * np.eye(21)])
    b = np.vstack([y, np.zeros((21, 4))])
    np.testing.assert_allclose(w.numpy(), np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_lsr_rejects_bad_input():
    with pytest.raises(ValueError, match="features \\(N, D\\)"):
        fewshot.lsr_accuracy(np.zeros(5), np.zeros(5), np.zeros((2, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        fewshot.lsr_accuracy(np.zeros((5, 2)), np.zeros(5), np.zeros((2, 2)), np.zeros(2), l2=-1)


class PixelFeatures(torch.nn.Module):
    """A stand-in model whose pre-logits features are the flattened first channel (the digit's pixels)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        return x[:, 0].flatten(1)

    def forward_head(self, x, pre_logits=False):
        assert pre_logits
        return x


def rendered(dataset):
    """All (images, labels) of a digits set as numpy arrays, read one by one as a DataLoader without batching would."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).numpy(), torch.stack(labels).numpy()


def test_digits_render_when_read_as_upsampled_pixels():
    """The evaluation sets render when read (at 384 px all of them up front were 3 GiB): a DataLoader's batch, a
    single read and bilinear upsampling (torch's, away from the zero-padded border) give the same images."""
    from fastvit.data import DigitsSource

    data = DigitsSource(32)
    assert not any(t.shape[-1] == 32 for t in vars(data.test).values() if isinstance(t, torch.Tensor))
    x, y = next(iter(torch.utils.data.DataLoader(data.test, batch_size=5)))
    one = [data.test[i] for i in range(5)]
    assert torch.equal(x, torch.stack([im for im, _ in one])) and torch.equal(y, torch.stack([c for _, c in one]))
    up = F.interpolate(data.test.images[:5], size=32, mode="bilinear", align_corners=False) * 2 - 1
    assert x.shape == (5, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    torch.testing.assert_close(x[:, :1, 2:-2, 2:-2], up[..., 2:-2, 2:-2])


def test_evaluate_runner_on_digit_pixels():
    from fastvit.data import DigitsSource

    data = DigitsSource(8)
    results = fewshot.evaluate(PixelFeatures(), data.train_eval, data.test, shots=(1, 10), seeds=2, l2=1.0)
    assert set(results) == {1, 10} and all(len(r["accs"]) == 2 for r in results.values())
    # the runner equals a direct ridge fit on the sampled shots (numpy reference)
    train_x, train_y = rendered(data.train_eval)
    test_x, test_y = rendered(data.test)
    for k in (1, 10):
        for seed in range(2):
            idx = fewshot.sample_shots(train_y, k, seed)
            assert np.bincount(train_y[idx], minlength=10).tolist() == [k] * 10
            scores, _ = reference_scores(train_x[idx, 0].reshape(len(idx), -1), train_y[idx],
                                         test_x[:, 0].reshape(len(test_x), -1), 1.0, 10)
            assert results[k]["accs"][seed] == pytest.approx(float((scores.argmax(1) == test_y).mean()), abs=1e-12)
    assert results[10]["mean"] > 0.8 > results[1]["mean"] > 0.3  # pixels: 10 shots per class beat 1 shot
    for r in results.values():  # the sample std over the draws, as --seeds reports the top-1's
        assert r["std"] == pytest.approx(np.std(r["accs"], ddof=1), abs=1e-12) and r["mean"] == np.mean(r["accs"])
    assert not np.array_equal(fewshot.sample_shots(train_y, 5, 0), fewshot.sample_shots(train_y, 5, 1))
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        fewshot.evaluate(PixelFeatures(), data.train_eval, data.test, seeds=0)


def test_more_shots_than_a_class_has_warns_and_uses_them_all():
    from fastvit.data import DigitsSource

    data = DigitsSource(8)
    counts = np.bincount(data.train_eval.targets.numpy())
    with pytest.warns(UserWarning, match=rf"1000-shot: 10 of 10 classes have fewer than 1000 training images "
                                         rf"\(the fewest {counts.min()}\)"):
        results = fewshot.evaluate(PixelFeatures(), data.train_eval, data.test, shots=(1000,), seeds=1)
    idx = fewshot.sample_shots(data.train_eval.targets.numpy(), 1000, 0)
    assert len(idx) == counts.sum() and 0 < results[1000]["mean"] <= 1


def test_cli_builds_the_architecture_flags_and_refuses_partial_patches(capsys):
    """The size flags build a random (or weights-file) model as the trainer's do; an image size that is not whole
    patches is refused as the trainer refuses it, instead of dropping pixels."""
    from fastvit import fewshot
    from fastvit.restore import load_model_for_eval
    model, _ = load_model_for_eval(None, "vit_tiny_patch16_224", 16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert (model.patch_embed.patch_size, model.embed_dim, len(model.blocks)) == ((4, 4), 32, 1)
    with pytest.raises(SystemExit):
        fewshot.main(["--model", "vit_tiny_patch16_224", "--img-size", "30", "--patch-size", "4", "--embed-dim", "32",
                      "--depth", "1", "--num-heads", "2", "--shots", "1", "--seeds", "1"])
    assert "--img-size 30 must be divisible by patch_size (4, 4)" in capsys.readouterr().err


def test_cli_names_its_flags_in_errors(capsys):
    from fastvit import fewshot
    with pytest.raises(SystemExit):
        fewshot.main(["--seeds", "0"])
    assert "--seeds and --shots must be positive integers, got --seeds 0 and --shots 1 5 10 25" in capsys.readouterr().err
    for flags, message in ((["--l2", "-1"], "--l2 must be >= 0, got -1.0"),
                           (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                           (["--workers", "-1"], "--workers must be >= 0, got -1")):
        with pytest.raises(SystemExit):  # before any model is built or image read
            fewshot.main(["--init", "/nonexistent", *flags])
        assert message in capsys.readouterr().err


def test_a_weights_file_is_evaluated_at_the_size_its_position_table_was_trained_at(tmp_path, capsys):
    """--init weights.pth with --model: without --img-size the model takes the file's grid (4x4 patches of 4 ->
    16 px), so its position table loads as trained instead of being resampled to the registry's 224 px."""
    import fastvit
    from fastvit.restore import load_model_for_eval
    arch = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    trained = fastvit.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, **arch)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    model, size = load_model_for_eval(str(tmp_path / "w.pth"), "vit_tiny_patch16_224", **arch)
    assert size == 16 and torch.equal(model.pos_embed, trained.pos_embed)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), trained.forward_features(x))
    model, size = load_model_for_eval(str(tmp_path / "w.pth"), "vit_tiny_patch16_224", 32, **arch)  # --img-size wins
    assert size == 32 and model.pos_embed.shape[1] == 1 + 8 * 8
