"""dvc.yaml is wired to the code and settings it runs: every stage depends on the library
code its stage function imports, its params are keys of params.yaml, metrics point at the
summary JSONs, and every plot is some stage's output."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _imports(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (``tasks.*``, ``ddps_core.*``,
    ``flows.*``), names imported ``from`` a package counted as that package's submodules."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in ("tasks", "ddps_core", "flows")}


def _file_of(module: str) -> Path | None:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:k])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py" if k == len(parts) else None
    return None


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


#: Library modules every stage shares that cannot change what a stage computes: reading
#: params.yaml into settings (each stage's params cover the values), the error types, the
#: progress reporter, the stage registry, and the atomic write of bytes given to it.
GLUE = {REPO / "ddps_core" / f for f in ("config.py", "errors.py", "progress.py", "stages.py", "io.py",
                                         "__init__.py")}


def test_every_stage_runs_its_flow_and_depends_on_the_code_it_runs():
    from ddps_core import stages

    problems = []
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"python -m flows {name}", name
        deps = [str(d) for d in stage.get("deps", [])]
        # the stage's package, and the library modules its stage module imports
        first = _file_of(stages._MODULES[name])
        assert _covered(first.parent, deps), f"stage {name}: its package {first.parent} is not a dep"
        imported = {f for m in _imports(first) if m.startswith("ddps_core") if (f := _file_of(m)) is not None}
        for f in sorted(imported - GLUE):
            if not _covered(f, deps):
                problems.append(f"{name}: {f.relative_to(REPO)}")
    assert not problems, "stages miss deps on code they run:\n" + "\n".join(sorted(set(problems)))


def test_every_param_is_a_key_of_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in STAGES.items():
        for p in stage.get("params", []):
            node = params
            for part in p.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: {p!r} is not in params.yaml"
                node = node[part]


def test_metrics_and_plots_are_declared():
    metrics = {next(iter(m)) if isinstance(m, dict) else m
               for s in STAGES.values() for m in s.get("metrics", [])}
    assert metrics == {"reports/metrics/evaluate.json", "reports/metrics/refine.json"}
    plots = {next(iter(p)) if isinstance(p, dict) else p: (p[next(iter(p))] if isinstance(p, dict) else {})
             for p in DVC["plots"]}
    # the comparisons: one chart per table, every method a series of it
    assert plots["per_class_iou"]["y"] == {"reports/plots/per_class_iou.csv": [
        "teacher", "random_unet", "rgbxy", "student", "refiner", "refiner-gt"]}
    assert (REPO / ".dvc" / "plots" / f"{plots['per_class_iou']['template']}.json").is_file()
    assert plots["refine_steps"]["x"] == "step" and "refiner" in plots["refine_steps"]["y"]["reports/plots/refine_steps.csv"]
    assert plots["data/models/ddpm/loss.csv"]["x"] == "step"
    images = [p for p in plots if p.endswith(".png")]
    assert {"data/models/ddpm/samples.png", "reports/figures/refinement.png"} <= set(images)
    # every plotted file is produced by some stage (an out, or inside an out folder)
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for o in s.get("outs", [])]
    files = [p for p, spec in plots.items() if "/" in p] + [f for spec in plots.values() if isinstance(spec.get("y"), dict)
                                                            for f in spec["y"]]
    for p in files:
        # ... or a benchmark's result committed with the repository (python -m benchmarks run --only active)
        committed = p.startswith("reports/active/") and (REPO / p).is_file()
        assert committed or any(p == o or p.startswith(o.rstrip("/") + "/") for o in outs), \
            f"plot {p} is no stage's output"
