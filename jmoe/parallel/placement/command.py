"""`jmoe place`: a placement of a routing trace's experts over a mesh's expert axis."""

from __future__ import annotations

import sys

from jmoe.parallel.placement.base import PlacementStats, measures, place


def expert_devices(mesh: str | None, devices: int | None) -> int:
    """The devices a placement spreads experts over: the mesh's expert axis, or `devices`."""
    if mesh is None:
        return devices
    from jmoe.parallel.mesh import parse_mesh_spec

    axes = parse_mesh_spec(mesh)
    if axes.get("expert", 1) < 2:
        raise ValueError(f"--mesh {mesh!r} has no expert axis of 2 or more devices to place experts on")
    return axes["expert"]


def run_place(args, out=None) -> int:
    from jmoe.infer.offload_commands import check_new_file
    from jmoe.infer.trace import load

    out = out or sys.stdout
    dest = check_new_file(args.out, "--out")
    n = expert_devices(args.mesh, args.devices)
    trace = load(args.trace)
    stats = PlacementStats.from_trace(trace)
    E = stats.num_experts
    options = dict(args.option or [])
    placement = place(stats, args.method, n, E + args.redundant, options)
    report = {args.method: measures(placement, stats)}
    if args.method != "round_robin":
        report["round_robin"] = measures(place(stats, "round_robin", n), stats)
    placement.save(dest, extra={"trace": {"path": str(args.trace), "num_tokens": trace.num_tokens},
                                "measures": report})
    mine, base = report[args.method], report.get("round_robin", report[args.method])
    traffic = "" if mine["traffic"] is None else f", cross-device traffic {mine['traffic']:.3f} (round robin " \
                                                  f"{base['traffic']:.3f})"
    out.write(f"wrote {dest}: {args.method}, {E} experts x {stats.num_layers} MoE layers on {n} devices, "
              f"{placement.slots_per_device} slots each; excess load {mine['excess_load']:.3f} (round robin "
              f"{base['excess_load']:.3f}){traffic}\n")
    out.flush()
    return 0
