"""Proves a rendered deployment serves the whole model: every expert of every layer is held by
some pod, each expert has exactly the replicas the values declare, and the pods fit the
SuperPod's nodes without any node holding more expert bytes than its devices' memory.

    check_superpod.py RENDERED.yaml VALUES.yaml MODEL_CONFIG.json NODES DEVICES_PER_NODE

Expert bytes are computed here from the model's config.json (FP4 e2m1 weights, two per byte,
plus one UE8M0 scale byte per 32 weights; three matrices dim × moe_inter per expert and block),
independently of the chart.
"""

import json
import sys

import yaml


def expert_bytes(cfg):
    """Bytes of one routed expert over all blocks that have experts (main layers + MTP)."""
    dim, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    weights = 3 * dim * inter
    assert cfg.get("expert_dtype", "fp4") == "fp4", "this check sizes FP4 experts"
    per_block = weights // 2 + weights // 32
    blocks = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    return per_block * blocks


def arg(container, name):
    for a in container.get("args", []):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def expand(values):
    """(group, first, last, replicas) the values declare, with `split` applied as the chart does."""
    out = []
    for g in values["expertShards"]:
        first, last = g["experts"]["from"], g["experts"]["to"]
        count, split = last - first + 1, g.get("split", 1)
        for i in range(split):
            a = first + i * count // split
            b = first + (i + 1) * count // split - 1
            out.append((g["name"] if split == 1 else f"{g['name']}-{i}", a, b, g.get("replicas", 1)))
    return out


def main(rendered, values_file, config_file, nodes, devices_per_node):
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    values = yaml.safe_load(open(values_file))
    cfg = json.load(open(config_file))
    n_experts = cfg["n_routed_experts"]
    resource = values["accelerator"]["resourceName"]
    device_memory = values["accelerator"]["deviceMemoryBytes"]
    per_expert = expert_bytes(cfg)
    assert values["model"]["routedExperts"] == n_experts, "values' routedExperts differs from the config"

    pods = []  # (statefulset, first, last, devices) per pod
    for d in docs:
        if d["kind"] != "StatefulSet" or d["metadata"]["labels"].get("expertmesh.io/role") != "expert":
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert arg(c, "layers") is None, f"{d['metadata']['name']} holds only some layers"
        first, last = map(int, arg(c, "experts").split("-"))
        devices = int(c["resources"]["limits"].get(resource, 0))
        assert devices > 0, f"{d['metadata']['name']} requests no {resource}"
        pods += [(d["metadata"]["name"], first, last, devices)] * d["spec"]["replicas"]

    # Coverage and declared redundancy, expert by expert (every layer: no pod restricts layers).
    held = [0] * n_experts
    for _, a, b, _ in pods:
        for e in range(a, b + 1):
            held[e] += 1
    declared = [0] * n_experts
    for _, a, b, r in expand(values):
        for e in range(a, b + 1):
            declared[e] += r
    missing = [e for e in range(n_experts) if held[e] == 0]
    assert not missing, f"experts held by no pod: {missing}"
    assert held == declared, f"replicas differ from the values: {[(e, held[e], declared[e]) for e in range(n_experts) if held[e] != declared[e]]}"

    # Memory: each pod's experts within its devices, and a placement of all pods on the nodes
    # (first fit, largest first, replicas of one group on different nodes) that no node's
    # devices overflow.
    for name, a, b, devices in pods:
        need = (b - a + 1) * per_expert
        assert need <= devices * device_memory, f"{name}: {need} expert bytes on {devices} devices"
    free = [devices_per_node] * nodes
    bytes_on = [0] * nodes
    groups_on = [set() for _ in range(nodes)]
    for name, a, b, devices in sorted(pods, key=lambda p: -p[3]):
        node = next((i for i in range(nodes) if free[i] >= devices and name not in groups_on[i]), None)
        assert node is not None, f"no node left for a pod of {name} ({devices} devices)"
        free[node] -= devices
        bytes_on[node] += (b - a + 1) * per_expert
        groups_on[node].add(name)
    worst = max(bytes_on)
    assert worst <= devices_per_node * device_memory, f"a node holds {worst} expert bytes"
    used = nodes * devices_per_node - sum(free)
    print(
        f"ok: {n_experts} experts × {cfg['num_hidden_layers'] + cfg.get('num_nextn_predict_layers', 0)} blocks in "
        f"{len(pods)} pods on {nodes} nodes ({used} of {nodes * devices_per_node} devices); "
        f"replicas per expert {min(held)}-{max(held)}; fullest node {worst / 2**30:.1f} GiB of "
        f"{devices_per_node * device_memory / 2**30:.0f} GiB ({per_expert / 2**30:.2f} GiB per expert)"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
