"""``rf bench dataset``: a dataset on one node vs on a multi-node cluster that loses a node.

Both schemes reconstruct the same objects (``rf_core.ground_truth.example_objects``: ``rf
render-gt`` views of pybullet's textured meshes; the photo is one GT view, so held-out views and
the mesh are evaluated) with the same logical CPUs in total:

- ``single``: one Ray node with ``nodes`` CPUs;
- ``cluster``: a local multi-node cluster (``ray.cluster_utils.Cluster``: a head with no CPUs
  for the driver, and ``nodes`` worker nodes with one CPU each). Once an object has written a
  checkpoint, the node running it is killed (raylet and workers, like a lost machine); its
  object is re-run on a surviving node and resumes from that checkpoint.

The report: objects/hour of each scheme, and for the cluster the killed node, which objects
were retried and where they resumed, and that MLflow holds exactly one finished run per object.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import mlflow
import ray

from rf_bench.common import cpu_name, write_json
from rf_core.errors import OutputError
from rf_core.evaluation.metric_registry import HELDOUT_PSNR, INPUT_PSNR
from rf_core.files.run_folder import read_marker, write_marker
from rf_core.ground_truth.example_objects import make_objects
from rf_distributed.tracking import tags as rf_tags

__all__ = ["QUICK_OVERRIDES", "format_dataset_bench", "run_dataset_bench"]

QUICK_OVERRIDES = ["recon.steps=24", "recon.albedo_steps=6", "recon.levels=[0,4,8,12]",
                   "inversion.steps=2", "checkpoint_every=6", "export.video.frames=4",
                   "export.video.size=32", "export.mesh_resolution=32", "input.size=64",
                   "recon.lr=[0,0.02,0.002,24,log]"]


def _finished_runs(uri: str, experiment: str) -> dict[str, int]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{rf_tags.KIND}` = 'object' and "
                              f"tags.`{rf_tags.STATUS}` = 'finished'", max_results=1000)
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.data.tags[rf_tags.OBJECT]] = counts.get(r.data.tags[rf_tags.OBJECT], 0) + 1
    return counts


def _checkpoint_step(state_json: Path) -> int | None:
    """The step of a checkpoint's ``state.json`` (``rf_core.files.checkpoint``'s layout)."""
    try:
        return int(dict(json.loads(state_json.read_text())["__dict__"])["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being rewritten right now


def _kill_when_checkpointed(cluster, out: Path, stop: threading.Event, record: dict) -> None:
    """Kill the node of the first object that has a checkpoint (and is not finished)."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    while not stop.is_set():
        for work in sorted((out / ".work").glob("*")) if (out / ".work").is_dir() else []:
            ckpt = work / ".run.partial" / "checkpoint" / "state.json"
            node_file = work / "node"
            if ckpt.is_file() and node_file.is_file() and not (work / "run").exists():
                node_id = node_file.read_text().strip()
                if node_id in nodes:
                    record.update({"object": work.name, "node_id": node_id,
                                   "at_step": _checkpoint_step(ckpt),
                                   "at_seconds": time.perf_counter() - record["t0"]})
                    cluster.remove_node(nodes[node_id], allow_graceful=False)
                    return
        stop.wait(0.2)


def _scheme(scheme: str, manifest: Path, folder: Path, nodes: int, overrides: list[str]) -> dict:
    from ray.cluster_utils import Cluster

    from rf_core.progress import quiet
    from rf_distributed.dataset_run import run_dataset

    out, uri = folder / scheme, f"sqlite:///{(folder / f'{scheme}.db').resolve()}"
    cluster, killed = None, {}
    init = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if scheme == "single":
        ray.init(address="local", num_cpus=nodes, **init)  # never an existing `ray start` cluster
    else:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, **init)
    stop = threading.Event()
    t0 = time.perf_counter()
    try:
        if cluster is not None:
            killed["t0"] = t0
            killer = threading.Thread(target=_kill_when_checkpointed,
                                      args=(cluster, out, stop, killed), daemon=True)
            killer.start()
        with quiet():
            summary = run_dataset(manifest, out, preset="tiny", overrides=overrides,
                                  tracking_uri=uri, experiment=f"bench-{scheme}")
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    killed.pop("t0", None)
    counts = _finished_runs(uri, f"bench-{scheme}")
    results = {}
    for row in summary["rows"]:
        folder_obj = out / row["object"]
        result = json.loads((folder_obj / "result.json").read_text()) if (
            folder_obj / "result.json").is_file() else {}
        results[row["object"]] = {"status": row["status"],
                                  "resumed_from": result.get("metrics", {}).get("resumed_from"),
                                  HELDOUT_PSNR: row.get(HELDOUT_PSNR),
                                  INPUT_PSNR: row.get(INPUT_PSNR)}
    return {"scheme": scheme, "nodes": 1 if scheme == "single" else nodes, "cpus": nodes,
            "wall_seconds": wall, "finished": summary["finished"], "failed": summary["failed"],
            "objects_per_hour": summary["finished"] / wall * 3600.0,
            "mlflow_finished_runs": counts,
            "exactly_once": all(counts.get(o, 0) == 1 for o in results) and len(counts) == len(
                results),
            "killed": killed or None, "objects": results, "means": summary["means"]}


def run_dataset_bench(objects: int = 6, nodes: int = 3, json_path: str | os.PathLike | None = None,
                      *, out_dir: str | os.PathLike = "outputs/bench_dataset", quick: bool = False,
                      schemes: tuple[str, ...] = ("single", "cluster"),
                      overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run both schemes on the same objects; returns (and writes) the comparison.

    ``overrides`` (``KEY=VALUE``) apply to every object after the benchmark's own (a later
    override of the same key wins)."""
    if ray.is_initialized():
        raise RuntimeError("rf bench dataset starts its own Ray clusters; run it in a fresh "
                           "process")
    folder = Path(out_dir).resolve()
    marker = read_marker(folder)
    if folder.is_dir() and any(folder.iterdir()) and (marker or {}).get("kind") != "bench-dataset":
        raise OutputError(f"--out {folder} is not empty and not a folder of `rf bench dataset`; "
                          "choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    if marker is None:
        write_marker(folder, "bench-dataset")  # from now on, what is inside is the benchmark's
    for scheme in schemes:  # a benchmark starts clean; the inputs are kept
        for stale in (folder / scheme, folder / f"{scheme}.db", folder / "artifacts"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    manifest = make_objects(folder / "inputs", objects, size=64 if quick else 128,
                            views=3 if quick else 9)
    overrides = [*(QUICK_OVERRIDES if quick else ["input.size=128"]), *overrides]
    result = {"benchmark": "dataset", "machine": cpu_name(), "cpu_count": os.cpu_count(),
              "objects": objects, "nodes": nodes, "preset": "tiny", "overrides": overrides,
              "quick": quick, "schemes": {}}
    for scheme in schemes:
        result["schemes"][scheme] = _scheme(scheme, manifest, folder, nodes, overrides)
    if {"single", "cluster"} <= set(result["schemes"]):
        s, c = result["schemes"]["single"], result["schemes"]["cluster"]
        result["cluster_vs_single_throughput"] = c["objects_per_hour"] / s["objects_per_hour"]
    if json_path:
        write_json(json_path, result)
    return result


def format_dataset_bench(result: dict) -> str:
    """The report of :func:`run_dataset_bench` as a Markdown table and a few lines."""
    lines = [f"{result['objects']} objects, tiny preset, {result['nodes']} CPUs in total "
             f"({result['machine']}, {result['cpu_count']} cores)", "",
             "| scheme | nodes | finished | failed | wall s | objects/hour | exactly once in "
             "MLflow | node killed |", "|---|---|---|---|---|---|---|---|"]
    for s in result["schemes"].values():
        k = s["killed"]
        killed = (f"yes, at {k['at_seconds']:.0f} s ({k['object']} at step {k['at_step']})"
                  if k else "no")
        lines.append(f"| {s['scheme']} | {s['nodes']} | {s['finished']} | {s['failed']} | "
                     f"{s['wall_seconds']:.0f} | {s['objects_per_hour']:.1f} | "
                     f"{'yes' if s['exactly_once'] else 'NO'} | {killed} |")
    if "cluster_vs_single_throughput" in result:
        lines.append(f"\ncluster (with a node lost) vs single node: "
                     f"{result['cluster_vs_single_throughput']:.2f}x the objects/hour")
    cluster = result["schemes"].get("cluster")
    if cluster and cluster["killed"]:
        name = cluster["killed"]["object"]
        lines.append(f"{name} (on the killed node) resumed from step "
                     f"{cluster['objects'][name]['resumed_from']} on another node")
    return "\n".join(lines)
