"""Sample grids of the generation task: a class per row from seeded noise, pixels as the FID sees them; a sweep
trial logs one to its MLflow run per evaluation (none again when replayed), and the report puts the
strategies' grids side by side at the winning size, on the parent run and in leaderboard.md. Real
Fashion-MNIST, a tiny DiT, a 20-sample 2-step evaluation: seconds."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from weit_core.models.dit import DIT, create_dit
from weit_core.tasks import CLASSIFICATION
from weit_core.tasks.generation import _unit_range, make_generation_task, sample
from weit_core.train import iterate_batches, seed_everything

IO = {"in_chans": 1, "img_size": 28, "num_classes": 10}
SPACE = """
name: grids
family: dit
tasks: [{name: fmnist_gen, task: "generation:20x2", data: fashion_mnist, patch: 7, limit: 256, val_limit: 64}]
strategies: [scratch, scratch_fit]
sizes: {depth: 1, width: 16, heads: 2}
training: {epochs: 2, batch_size: 64, lr: 0.003, fit_steps: 2, fit_examples: 64, seeds: [0]}
"""


@pytest.fixture(scope="module")
def fmnist(fmnist_dir):
    from weit_core.data import load_fashion_mnist

    return load_fashion_mnist(fmnist_dir, limit=600)


def _dit(seed: int) -> torch.nn.Module:
    """A tiny DiT whose output is not zero (adaLN-zero makes every untrained DiT the same sampler)."""
    seed_everything(0)
    model = create_dit(DIT.spec_for({"depth": 1, "width": 16, "heads": 2, "patch": 7}, IO))
    with torch.no_grad():
        model.final_layer.linear.weight.copy_(torch.randn(model.final_layer.linear.weight.shape,
                                                          generator=torch.Generator().manual_seed(seed)))
    return model


def test_a_grid_is_a_row_per_class_of_seeded_samples_mapped_as_the_fid_sees_them(fmnist):
    task = make_generation_task("grid_test", samples=64, steps=2)
    x, y = fmnist.val.x[:64], fmnist.val.y[:64]
    keep = torch.isin(y, torch.tensor([1, 3, 7]))  # three classes, out of order in the data
    batches = lambda: iterate_batches(x[keep], y[keep], 16, shuffle=False)  # noqa: E731
    model, other = _dit(1), _dit(2)
    model.train()
    rng = torch.get_rng_state()
    grid = task.sample_grid(model, batches(), "cpu")
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode kept, training's stream untouched
    assert grid.shape == (3, 2 + 3 * 30, 2 + 8 * 30) and 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(grid, task.sample_grid(model.eval(), batches(), "cpu")) and not model.training
    assert not torch.equal(grid, task.sample_grid(other, batches(), "cpu"))
    lo, span = _unit_range(x[keep])
    cells = ((sample(model, torch.tensor([1, 3, 7]).repeat_interleave(8), (1, 28, 28), steps=2) - lo) / span
             ).clamp(0, 1)
    for row in range(3):  # the cell at (row, col) is sample row * 8 + col, in grey on all three channels
        for col in (0, 7):
            cell = grid[:, 2 + 30 * row:30 * (row + 1), 2 + 30 * col:30 * (col + 1)]
            assert torch.equal(cell, cells[row * 8 + col].expand(3, -1, -1))
    assert CLASSIFICATION.sample_grid is None  # tasks without a picture log none


@pytest.fixture(scope="module")
def grid_sweep(fmnist_dir, tmp_path_factory):
    """Two generation trials (scratch, scratch_fit) run as a sweep runs them, under a parent run."""
    import mlflow

    from pipelines.tracking import SWEEP_EXPERIMENT, TrialTracker, prepare_mlflow
    from pipelines.trial import run_trial
    from weit_core.space import parse_space
    from weit_core.trials import expand

    root = tmp_path_factory.mktemp("grids")
    uri, exp_id = prepare_mlflow(f"sqlite:///{root / 'mlruns.db'}", SWEEP_EXPERIMENT)
    parent = mlflow.MlflowClient(uri).create_run(exp_id, tags={"weit.kind": "sweep", "weit.sweep": "grids"})
    trials = expand(parse_space(SPACE), {"fmnist_gen": IO}).trials
    results = [run_trial(c, tracker=TrialTracker(uri, exp_id, parent.info.run_id, "grids", save_models=False))
               for c in trials]
    return uri, exp_id, parent.info.run_id, trials, results, root


def _images(client, run_id: str) -> list[str]:
    return [f.path for f in client.list_artifacts(run_id, "images")]


def test_a_trial_logs_one_samples_image_per_evaluation_and_a_replay_none(grid_sweep):
    import mlflow

    from pipelines.tracking import TrialTracker, last_samples
    from pipelines.trial import run_trial
    from weit_core.trials import load_task_data

    uri, exp_id, parent_id, trials, _, _ = grid_sweep
    client = mlflow.MlflowClient(uri)
    classes = len(load_task_data(trials[0]).val.y[:20].unique())  # the labels the 20-sample evaluation uses
    for config in trials:
        run_id = client.search_runs([exp_id], f"tags.`weit.trial_key` = '{config['key']}'")[0].info.run_id
        pngs = sorted(f for f in _images(client, run_id) if f.endswith(".png"))
        assert [p.split("+")[:3] for p in pngs] == [["images/samples", "step", str(e)] for e in range(3)], pngs
        assert last_samples(client, run_id) == (2, pngs[-1])
        assert Image.open(client.download_artifacts(run_id, pngs[-1])).size == (2 + 8 * 30, 2 + classes * 30)
        assert run_trial(config, tracker=TrialTracker(uri, exp_id, parent_id, "grids")).replayed
        assert len(_images(client, run_id)) == 6  # each png and its thumbnail, nothing more from the replay


def test_the_report_shows_each_strategys_grid_side_by_side_at_the_winning_size(grid_sweep, tmp_path):
    import mlflow

    from pipelines.report import build_report

    uri, _, parent_id, _, _, _ = grid_sweep
    report = build_report(parent_run_id=parent_id, out=tmp_path, mlflow_uri=uri, register=False, show=False)
    figure = tmp_path / "samples_fmnist_gen.png"
    assert figure in report.files and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(figure).size
    assert width > height  # two panels side by side (one alone is taller than wide)
    assert "](./samples_fmnist_gen.png)" in (tmp_path / "leaderboard.md").read_text()
    assert "report/samples_fmnist_gen.png" in {f.path for f in mlflow.MlflowClient(uri).list_artifacts(parent_id,
                                                                                                         "report")}
