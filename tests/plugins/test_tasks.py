"""The tasks plugin: synthetic tasks, language modelling, sequential MNIST, protocol recipes."""

from __future__ import annotations

import gzip
import logging
import lzma
import math
import os
import struct

import pytest
import torch
from click.testing import CliRunner

from seqplat import DataError, build_model, build_run_config, build_task, count_parameters
from seqplat.registry import get_registry

TASKS = ["copy_memory", "adding", "temporal_order", "ptb_char", "text8", "enwik8", "char_text", "ptb_word",
         "smnist", "psmnist"]
PROTOCOLS = ["ptb_char_1m", "copy_200", "adding_400", "psmnist_1ep", "temporal_order"]
REAL = os.environ.get("SEQPLAT_DATA")


def small(name: str, **options):
    return build_task({"name": name, **options})


def same_batch(a, b) -> bool:
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.reset == b.reset


# -- registry -------------------------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    info = reg.get_plugin("tasks")
    assert not info.broken, info.error
    assert sorted(info.registered["task"]) == sorted(TASKS)
    assert sorted(info.registered["recipe"]) == sorted(f"protocols/{p}" for p in PROTOCOLS)
    for name in TASKS:  # every config field is described
        cfg = reg.get("task", name).obj.config_class
        assert all(f.description for f in cfg.model_fields.values()), name


# -- synthetic tasks: shapes and determinism -------------------------------------------------------

SYNTHETIC = [
    ({"name": "copy_memory", "delay": 7}, (4, 27, 10), (4, 27)),
    ({"name": "copy_memory", "delay": 7, "encoding": "tokens"}, (4, 27), (4, 27)),
    ({"name": "copy_memory", "delay": 7, "encoding": "scalar"}, (4, 27, 1), (4, 27)),
    ({"name": "adding", "length": 30}, (4, 30, 2), (4, 1)),
    ({"name": "temporal_order", "length": 100}, (4, 100, 6), (4,)),
]


@pytest.mark.parametrize("spec,in_shape,target_shape", SYNTHETIC, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_synthetic_shapes_and_determinism(spec, in_shape, target_shape):
    task = build_task(spec)
    a = task.train_batch(3, 4, seed=0)
    assert tuple(a.inputs.shape) == in_shape and tuple(a.targets.shape) == target_shape
    assert same_batch(a, build_task(spec).train_batch(3, 4, seed=0))  # a fresh task, same (step, seed)
    assert not torch.equal(a.inputs, task.train_batch(4, 4, seed=0).inputs)
    assert not torch.equal(a.inputs, task.train_batch(3, 4, seed=1).inputs)
    assert task.steps_per_epoch(4) is None


def test_synthetic_eval_sets_fixed_and_sized():
    task = small("copy_memory", delay=5, valid_size=10, test_size=7, data_seed=3)
    valid = list(task.eval_batches("valid", 4))
    test = list(task.eval_batches("test", 4))
    assert [b.inputs.shape[0] for b in valid] == [4, 4, 2] and [b.inputs.shape[0] for b in test] == [4, 3]
    again = list(small("copy_memory", delay=5, valid_size=10, test_size=7, data_seed=3).eval_batches("valid", 4))
    assert all(same_batch(x, y) for x, y in zip(valid, again, strict=True))
    assert not torch.equal(valid[0].inputs, test[0].inputs)
    other = next(small("copy_memory", delay=5, valid_size=10, data_seed=4).eval_batches("valid", 4))
    assert not torch.equal(valid[0].inputs, other.inputs)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        list(task.eval_batches("train", 4))  # type: ignore[arg-type]


# -- copy memory -------------------------------------------------------------------------------

def test_copy_structure():
    T = 12
    task = small("copy_memory", delay=T, encoding="tokens")
    b = task.train_batch(0, 64, seed=0)
    x, y = b.inputs, b.targets
    assert x.shape == (64, T + 20)
    assert ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()
    assert (x[:, 10 : T + 9] == 0).all() and (x[:, T + 9] == 9).all() and (x[:, T + 10 :] == 0).all()
    assert (y[:, : T + 10] == 0).all() and torch.equal(y[:, -10:], x[:, :10])
    assert set(x[:, :10].unique().tolist()) == set(range(1, 9))
    assert task.num_outputs == 9 and task.vocab_size == 10


def test_copy_one_hot_and_scalar_encodings_agree():
    tok = small("copy_memory", delay=4, encoding="tokens").train_batch(2, 3, seed=5).inputs
    hot = small("copy_memory", delay=4).train_batch(2, 3, seed=5).inputs
    sca = small("copy_memory", delay=4, encoding="scalar").train_batch(2, 3, seed=5).inputs
    assert torch.equal(hot.argmax(-1), tok) and torch.equal(sca.squeeze(-1).long(), tok)


@pytest.mark.parametrize("T,expected", [(200, 0.0945), (100, 0.1733), (500, 0.0400)])
def test_copy_baseline_formula(T, expected):
    assert small("copy_memory", delay=T).baseline == pytest.approx(10 * math.log(8) / (T + 20))
    assert small("copy_memory", delay=T).baseline == pytest.approx(expected, abs=5e-5)


def test_copy_memoryless_predictor_scores_the_baseline():
    """Blank with certainty, then uniform over the 8 symbols: the loss is exactly the baseline."""
    task = small("copy_memory", delay=30, valid_size=16)
    b = next(task.eval_batches("valid", 16))
    logits = torch.full((16, 50, 9), -1e4)
    logits[:, :40, 0] = 0.0
    logits[:, 40:, 1:] = 0.0
    stats = task.batch_stats(logits, b)
    metrics = task.finalize(stats)
    assert metrics["loss"] == pytest.approx(task.baseline, rel=1e-6)
    perfect = torch.nn.functional.one_hot(b.targets, 9).float() * 50
    assert task.finalize(task.batch_stats(perfect, b))["copy_accuracy"] == 1.0


# -- adding problem ---------------------------------------------------------------------------------

def test_adding_structure_and_baseline():
    T = 50
    task = small("adding", length=T, test_size=2000)
    x, y = task.eval_set("test")
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert (markers.sum(1) == 2).all()
    assert (markers[:, : T // 2].sum(1) == 1).all() and (markers[:, T // 2 :].sum(1) == 1).all()
    assert torch.allclose((values * markers).sum(1, keepdim=True), y)
    assert task.baseline == pytest.approx(1 / 6)
    assert float(((y - 1) ** 2).mean()) == pytest.approx(1 / 6, abs=0.015)  # always predicting 1
    b = next(task.eval_batches("test", 8))
    metrics = task.finalize(task.batch_stats(torch.ones(8, 1), b))
    assert set(metrics) == {"loss", "mse", "rmse"} and metrics["rmse"] == pytest.approx(math.sqrt(metrics["mse"]))


# -- temporal order ---------------------------------------------------------------------------------

def test_temporal_order_structure():
    task = small("temporal_order")
    raw, labels = task.generate(500, torch.Generator().manual_seed(0))
    assert raw.shape == (500, 100) and labels.shape == (500,)
    keys = raw < 2
    assert (keys.sum(1) == 3).all()
    for k in range(3):  # the k-th key lies in the first 10 steps of the k-th third
        window = keys[:, 33 * k : 33 * k + 10]
        assert (window.sum(1) == 1).all()
    pattern = raw[keys].reshape(500, 3)  # keys in time order: X=0, Y=1
    assert torch.equal(pattern[:, 0] * 4 + pattern[:, 1] * 2 + pattern[:, 2], labels)
    assert set(labels.tolist()) == set(range(8))
    assert ((raw[~keys] >= 2) & (raw[~keys] <= 5)).all()
    onehot = task.encode(raw)
    assert onehot.shape == (500, 100, 6) and torch.equal(onehot.argmax(-1), raw)
    assert task.num_outputs == 8 and task.baseline == 0.125
    assert (task.config.valid_size, task.config.test_size) == (500, 1000)
    assert (task.head_kind, task.primary_metric, task.primary_mode) == ("last_step", "accuracy", "max")


def test_temporal_order_window_must_fit():
    with pytest.raises(Exception, match="window .* must fit in a third"):
        small("temporal_order", length=20, window=10)


# -- language modelling on small fixtures ------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("SEQPLAT_DATA", str(root))
    return root


def test_char_text_chunking(tmp_path):
    path = tmp_path / "t.txt"
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2000))
    path.write_text(text)
    task = small("char_text", path=str(path), bptt=10, valid_fraction=0.1, test_fraction=0.1)
    assert task.vocab == [chr(97 + i) for i in range(26)] and task.stream
    train = task.split("train")
    assert (train.numel(), task.split("valid").numel(), task.split("test").numel()) == (1600, 200, 200)
    rows = task.rows("train", 4)  # [4, 400]
    steps = task.steps_per_epoch(4)
    assert steps == 399 // 10
    batches = [task.train_batch(s, 4, seed=0) for s in range(steps + 1)]
    assert batches[0].reset and not any(b.reset for b in batches[1:steps]) and batches[steps].reset
    for s in range(steps - 1):  # consecutive chunks: each continues where the previous stopped
        a, b = batches[s], batches[s + 1]
        assert torch.equal(a.targets[:, -1], b.inputs[:, 0])
        assert torch.equal(a.targets[:, :-1], a.inputs[:, 1:])
    assert torch.equal(batches[0].inputs, rows[:, :10].long()) and batches[0].inputs.dtype == torch.long
    assert same_batch(batches[steps], batches[0])  # a new epoch starts again from chunk 0
    assert same_batch(task.train_batch(5, 4, seed=0), task.train_batch(5, 4, seed=9))
    evals = list(task.eval_batches("valid", 4))
    assert evals[0].reset and not any(b.reset for b in evals[1:])
    assert sum(b.inputs.shape[1] for b in evals) == 200 // 4 - 1


def test_char_text_relative_to_seqplat_data(data_dir):
    (data_dir / "books").mkdir()
    (data_dir / "books" / "b.txt.xz").write_bytes(lzma.compress("héllo wörld ".encode() * 200))
    task = small("char_text", path="books/b.txt.xz")
    assert "é" in task.vocab and task.vocab_size == 9
    assert task.split("train").numel() == 2160


def write_ptb_char(path, lines):
    path.write_text("".join(" ".join("_".join(line.split()) + "\n") + " " for line in lines))


def test_ptb_char_fixture(data_dir):
    (data_dir / "ptb").mkdir()
    lines = ["the cat sat", "a dog <unk> N"]
    for split in ("train", "valid", "test"):
        write_ptb_char(data_dir / "ptb" / f"ptb.char.{split}.txt", lines)
    task = small("ptb_char")
    ids = task.split("train")
    assert ids.numel() == len("the_cat_sat\na_dog_<unk>_N\n")
    assert "".join(task.vocab[i] for i in ids.tolist()) == "the_cat_sat\na_dog_<unk>_N\n"
    assert task.vocab_size == 50 and task.unit == "bpc"


def test_ptb_char_rejects_word_file(data_dir):
    (data_dir / "ptb").mkdir()
    (data_dir / "ptb" / "ptb.char.train.txt").write_text(" the cat sat \n")
    with pytest.raises(DataError, match="is not in Mikolov's character format"):
        small("ptb_char").split("train")


def test_ptb_word_needs_the_10k_vocabulary(data_dir):
    (data_dir / "ptb").mkdir()
    (data_dir / "ptb" / "ptb.train.txt.gz").write_bytes(gzip.compress(b" a b c \n a b \n"))
    task = small("ptb_word")
    assert task.vocab_size == 10000 and task.config.bptt == 35  # known without reading data
    with pytest.raises(DataError, match="has 4 word types, expected 10000"):
        task.split("train")


def test_hutter_split_of_a_short_file_warns(data_dir, caplog):
    (data_dir / "text8").mkdir()
    (data_dir / "text8" / "text8_first1000chars.xz").write_bytes(lzma.compress(b" abc xyz" * 125))
    task = small("text8")
    with caplog.at_level(logging.WARNING):
        sizes = [task.split(s).numel() for s in ("train", "valid", "test")]
    assert sizes == [900, 50, 50]
    assert "fewer than the canonical 100000000: using a proportional 90/5/5 split" in caplog.text
    assert task.vocab_size == 27


def test_enwik8_vocab_modes(data_dir):
    (data_dir / "enwik8").mkdir()
    blob = b"<page>abc</page>" * 60 + b"\xff" * 40  # the 0xff bytes fall in valid/test only
    (data_dir / "enwik8" / "enwik8").write_bytes(blob)
    task = small("enwik8", vocab="bytes")
    assert task.vocab_size == 256 and torch.equal(task.split("test").long(), torch.tensor(list(blob[950:])))
    trained = small("enwik8")
    assert trained.vocab_size == len(set(blob[:900]))
    with pytest.raises(DataError, match="never occur in its train split; set task.vocab=bytes"):
        trained.split("test")


def test_text8_rejects_foreign_symbols(data_dir):
    (data_dir / "text8").mkdir()
    (data_dir / "text8" / "text8").write_bytes(b"abc Def")
    with pytest.raises(DataError, match=r"has symbol b'D' \(offset 4\) outside the vocabulary of 27 symbols"):
        small("text8").split("train")


def test_missing_lm_data_names_the_fix(data_dir):
    with pytest.raises(DataError, match=r"^No ptb/ptb.char.train.txt under SEQPLAT_DATA="):
        small("ptb_char").prepare()


# -- MNIST on small fixtures ------------------------------------------------------------------------

def idx(array: torch.Tensor, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + bytes(array.flatten().tolist())


@pytest.fixture
def mnist_dir(data_dir):
    g = torch.Generator().manual_seed(0)
    folder = data_dir / "mnist"
    folder.mkdir()
    for prefix, n in (("train", 30), ("t10k", 6)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        images[:, 0, 0] = torch.arange(n, dtype=torch.uint8)  # an image's id in its first pixel
        labels = torch.arange(n, dtype=torch.uint8) % 10
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images, 0x803)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(labels, 0x801))
    return folder


def test_smnist_fixture(mnist_dir):
    task = small("smnist", valid_size=10)
    task.prepare()
    assert [task.split(s)[0].shape[0] for s in ("train", "valid", "test")] == [20, 10, 6]
    assert task.split("valid")[0][:, 0].tolist() == list(range(10))  # validation = first images
    b = task.train_batch(0, 4, seed=0)
    assert b.inputs.shape == (4, 784, 1) and b.targets.shape == (4,)
    assert float(b.inputs.max()) <= 1.0 and float(b.inputs.min()) >= 0.0
    assert same_batch(b, small("smnist", valid_size=10).train_batch(0, 4, seed=0))
    assert task.steps_per_epoch(4) == 5
    seen = torch.cat([task.train_batch(s, 4, seed=0).inputs[:, 0, 0] for s in range(5)])
    assert sorted((seen * 255).round().long().tolist()) == list(range(10, 30))  # one epoch = each image once
    nxt = torch.cat([task.train_batch(s, 4, seed=0).inputs[:, 0, 0] for s in range(5, 10)])
    assert not torch.equal(seen, nxt)  # reshuffled each epoch
    assert not torch.equal(seen, torch.cat([task.train_batch(s, 4, seed=1).inputs[:, 0, 0] for s in range(5)]))
    assert [x.inputs.shape[0] for x in task.eval_batches("test", 4)] == [4, 2]
    p7 = small("smnist", valid_size=10, pixels_per_step=7).train_batch(0, 4, seed=0).inputs
    assert p7.shape == (4, 112, 7) and torch.equal(p7.reshape(4, 784, 1), b.inputs)


def test_psmnist_permutation(mnist_dir):
    task = small("psmnist", valid_size=10)
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(92916))
    assert torch.equal(task.permutation, perm)
    plain = small("smnist", valid_size=10).train_batch(1, 4, seed=0).inputs
    permuted = task.train_batch(1, 4, seed=0).inputs
    assert torch.equal(permuted[:, :, 0], plain[:, perm, 0])
    assert not torch.equal(small("psmnist", permutation_seed=1).permutation, perm)


def test_smnist_config_errors():
    with pytest.raises(Exception, match="must divide 784"):
        small("smnist", pixels_per_step=5)


def test_idx_wrong_magic(mnist_dir):
    (mnist_dir / "t10k-labels-idx1-ubyte").write_bytes(idx(torch.zeros(6, dtype=torch.uint8), 0x803))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has IDX magic 0x00000803, expected 0x00000801"):
        small("smnist", valid_size=10).prepare()


def test_idx_truncated(mnist_dir):
    path = mnist_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"has 4604 data bytes, its IDX header \(6, 28, 28\) says 4704"):
        small("smnist", valid_size=10).prepare()


def test_idx_truncated_gzip(mnist_dir):
    path = mnist_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is truncated or corrupt"):
        small("smnist", valid_size=10).prepare()


# -- recipes ---------------------------------------------------------------------------------------

BASELINE_PARAMS = {"ptb_char_1m": 999_186, "copy_200": 72_841, "adding_400": 67_713, "psmnist_1ep": 68_362,
                   "temporal_order": 20_072, "ptb_char_small": 999_186}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_recipes(protocol):
    run = build_run_config(recipe=f"protocols/{protocol}")
    expected = {"ptb_char_1m": ("ptb_char", 3000, 32), "copy_200": ("copy_memory", 2000, 128),
                "adding_400": ("adding", 2000, 128), "psmnist_1ep": ("psmnist", 900, 64),
                "temporal_order": ("temporal_order", 20000, 20)}[protocol]
    assert (run.task["name"], run.train.steps, run.train.batch_size) == expected
    assert run.train.optimizer == "adam"


@pytest.mark.parametrize("recipe", sorted(BASELINE_PARAMS))
def test_baseline_recipes_parameter_budget(recipe):
    run = build_run_config(recipe=f"baselines/{recipe}")
    assert run.cell["name"] == "lstm"
    assert count_parameters(build_model(run)) == BASELINE_PARAMS[recipe]


def test_protocol_budgets():
    """The LSTM baselines sit inside each protocol's parameter budget (PROTOCOLS.md)."""
    assert abs(BASELINE_PARAMS["ptb_char_1m"] - 1_000_000) <= 100_000
    for name in ("copy_200", "adding_400", "psmnist_1ep"):
        assert abs(BASELINE_PARAMS[name] - 70_000) <= 0.05 * 70_000
    assert abs(BASELINE_PARAMS["temporal_order"] - 20_000) <= 0.05 * 20_000


def test_baselines_default_runs(tmp_path, monkeypatch):
    from seqplat.cli import main

    monkeypatch.delenv("SEQPLAT_DATA", raising=False)  # needs no data
    result = CliRunner().invoke(main, [
        "train", "--recipe", "baselines/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "tracking.enabled=false", "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


# -- the real benchmark copies (SEQPLAT_DATA) ----------------------------------------------------------

@pytest.fixture(scope="module")
def real_mnist():
    from seqplat.plugins.tasks.mnist import load_mnist

    return load_mnist("train"), load_mnist("test")


@pytest.mark.data
def test_real_ptb_char():
    task = small("ptb_char")
    sizes = [task.split(s).numel() for s in ("train", "valid", "test")]
    assert sizes == [5_017_482, 393_042, 442_423]  # shared/data/ptb/README.md, newline tokens included
    assert task.vocab_size == 50
    assert len(torch.unique(task.split("train"))) == 50
    assert int((task.split("valid") == task.vocab.index("\n")).sum()) == 3370
    assert task.baseline == pytest.approx(4.334, abs=1e-3)  # unigram entropy, PROTOCOLS.md: 4.3 BPC


@pytest.mark.data
def test_real_ptb_word():
    task = small("ptb_word")
    sizes = [task.split(s).numel() for s in ("train", "valid", "test")]
    assert sizes == [929_589, 73_760, 82_430]
    assert len(task.vocab) == 10_000 and task.vocab[0] == "the" and "<unk>" in task.vocab
    assert int((task.split("test") == task.vocab.index("<eos>")).sum()) == 3761


@pytest.mark.data
def test_real_mnist(real_mnist):
    (train_x, train_y), (test_x, test_y) = real_mnist
    assert train_x.shape == (60_000, 784) and test_x.shape == (10_000, 784)
    assert torch.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert float(train_x.double().mean() / 255) == pytest.approx(0.1306605, abs=1e-6)
    task = small("psmnist")
    assert task.steps_per_epoch(64) == 55_000 // 64
    assert sum(b.inputs.shape[0] for b in task.eval_batches("test", 2500)) == 10_000


@pytest.mark.data
def test_real_partial_hutter_files(caplog):
    from seqplat.plugins.tasks.language import hutter_bounds

    hutter_bounds.cache_clear()
    with caplog.at_level(logging.WARNING):
        text8 = [small("text8").split(s).numel() for s in ("train", "valid", "test")]
        enwik8 = small("enwik8")
        sizes = [enwik8.split(s).numel() for s in ("train", "valid", "test")]
    assert sum(text8) == 3_010_294 and text8[0] == 3_010_294 * 90 // 100
    assert sum(sizes) == 4_154_399 and enwik8.vocab_size == 200
    assert caplog.text.count("proportional 90/5/5 split") == 2


# -- end to end through the trainer -------------------------------------------------------------------

def test_trainer_runs_smnist_fixture(mnist_dir, tmp_path):
    from seqplat.core.train import train

    run = build_run_config(recipe="baselines/psmnist_1ep", overrides=[
        "task.valid_size=10", "task.pixels_per_step=28", "cell.hidden_size=8", "train.steps=6", "train.batch_size=4",
        "train.eval_every=3", "train.eval_batch_size=4", "tracking.enabled=false", f"io.output_dir={tmp_path}",
    ])
    result = train(run)
    assert set(result.test_metrics) >= {"loss", "accuracy", "macro_f1"}
    assert 0.0 <= result.test_metrics["accuracy"] <= 1.0


@pytest.mark.data
def test_trainer_runs_ptb_char(tmp_path):
    from seqplat.core.train import train

    run = build_run_config(recipe="baselines/ptb_char_small", overrides=[
        "cell.hidden_size=16", "model.embedding_size=8", "task.bptt=20", "task.max_eval_tokens=2000",
        "train.steps=3", "train.eval_every=3", "tracking.enabled=false", f"io.output_dir={tmp_path}",
    ])
    result = train(run)
    assert result.valid_metrics["bpc"] == pytest.approx(result.valid_metrics["loss"] / math.log(2))
    assert 4.0 < result.test_metrics["bpc"] < 6.5  # near uniform over 50 symbols (5.64) after 3 steps
