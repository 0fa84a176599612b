"""What tests/deploy.rs checks in deploy/daemonset.yaml, one fact per line.

usage: deploy_facts.py DAEMONSET_YAML POOL_TOML_OUT
Writes the ConfigMap's pool.toml to POOL_TOML_OUT and prints:
  arg <each argument of the pool-manager container>
  probe <readiness path> <port> <host, "-" when absent (the pod's IP)>
  publish <source file> <host directory it lands in>   (postStart copy, through its volume)
  config <host-side name of the volume mounted at /etc/warmpool: configmap NAME>
  run <host directory of the socket volume>
  fn_env <NAME> <VALUE>                                  (the example function pod)
  fn_mount <container path> <host path>
"""
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = {d["kind"]: d for d in docs}
ds = by_kind["DaemonSet"]["spec"]["template"]["spec"]
c = ds["containers"][0]
vols = {v["name"]: v for v in ds["volumes"]}
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

for a in c["args"]:
    print("arg", a)
p = c["readinessProbe"]["httpGet"]
print("probe", p["path"], p["port"], p.get("host", "-"))
src, dst = c["lifecycle"]["postStart"]["exec"]["command"][1:3]
dst_dir = dst.rstrip("/")
print("publish", src, vols[mounts[dst_dir]]["hostPath"]["path"])
cfg = vols[mounts["/etc/warmpool"]]
print("config configmap", cfg["configMap"]["name"])
cm = by_kind["ConfigMap"]
assert cm["metadata"]["name"] == cfg["configMap"]["name"], "the DaemonSet mounts another ConfigMap"
open(sys.argv[2], "w").write(cm["data"]["pool.toml"])
print("run", vols[mounts["/run/warmpool"]]["hostPath"]["path"])

pod = by_kind["Pod"]["spec"]
fvols = {v["name"]: v for v in pod["volumes"]}
fc = pod["containers"][0]
for e in fc["env"]:
    print("fn_env", e["name"], e["value"])
for m in fc["volumeMounts"]:
    print("fn_mount", m["mountPath"], fvols[m["name"]]["hostPath"]["path"])
