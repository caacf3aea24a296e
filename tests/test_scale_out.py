"""Scale-out end to end: two vLLM engines (separate processes, CPU build, SmolLM2) serving
overlapping prompts at the same time against one real Redis Cluster (3 masters + 3 replicas)
and one real S3 (SeaweedFS).

* phase 1, concurrently: each engine computes its own prompts, and both compute one common
  prompt at the same moment (concurrent writers of the same keys);
* phase 2, concurrently: each engine serves the other's prompts and the common one: every
  prefix the other computed is loaded (counted), with the producer's greedy tokens, and no
  engine ever meets a corrupt object;
* ``kvstrata lookup --url`` (a third process) on a cached prompt reports the per-tier tokens
  the following request loads -- also right after a Redis master was killed, when the prefix
  stops at the first chunk on the dead master and the request still succeeds with the same
  tokens;
* ``kvstrata stats`` (a third process) over both engines' exporters sees both engines' hits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM's CPU build (scripts/setup.sh test installs it)")

import redis  # noqa: E402

from kvstrata.offline.convert import prepare_smollm2  # noqa: E402
from kvstrata.testing import services as svc  # noqa: E402

PROMPT_TOKENS = 1100
CHUNK = 256
HIT = (PROMPT_TOKENS - 1) // CHUNK * CHUNK
# name -> (text offset, tier hint); a* computed by engine A, b* by B, c by both at once
PROMPTS = {
    "a0": (81000, "cold"),
    "a1": (84000, "shared"),
    "b0": (87000, "cold"),
    "b1": (90000, "shared"),
    "c": (93000, "shared"),
}

ENGINE = (
    f"PROMPT_TOKENS, CHUNK = {PROMPT_TOKENS}, {CHUNK}\n"
    + """
import json, sys
from kvstrata.telemetry import exporter
from kvstrata.offline.runner import generate, make_llm, text_tokens
from kvstrata.orchestrator import flush_shared, shared_orchestrators

def bad_objects(orch):
    return sum(orch.telemetry.value("kvstrata_bad_objects_total", tier=t, reason=r)
               for t in ("shared", "cold") for r in ("corrupt", "foreign", "unsupported", "codec"))

if __name__ == "__main__":
    llm = make_llm(sys.argv[1], sys.argv[2], kv_cache_gib=1)
    prompts = json.loads(sys.argv[3])
    tok = llm.get_tokenizer()
    ids = {
        name: text_tokens(tok, PROMPT_TOKENS, offset=offset)
        for name, (offset, _) in prompts.items()
    }
    (orch,) = shared_orchestrators()
    (service,) = exporter.services()
    print("READY " + json.dumps({"url": service.url, "ids": ids}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "keys":
            from kvstrata.keys import chunk_keys
            keys = chunk_keys(ids[cmd["name"]], orch.model.namespace(), CHUNK)
            out = [orch.tiers["shared"]._name(k) for k in keys]
        else:
            out = {}
            for name in cmd["names"]:
                r = generate(llm, ids[name], 8, kv_params={"tier": prompts[name][1]})
                out[name] = {"cached": r.num_cached_tokens, "loaded": r.kvstrata["loaded_tokens"],
                             "tokens": list(r.token_ids)}
            assert flush_shared(120)
            out = {"results": out, "bad_objects": bad_objects(orch)}
        print("RESULT " + json.dumps(out), flush=True)
"""
)


def strata_yaml(cluster_url: str, s3) -> str:
    return textwrap.dedent(f"""\
        version: 1
        chunk_tokens: {CHUNK}
        tiers:
          shared: {{kind: redis, url: "{cluster_url}", key_prefix: "scale:"}}
          cold:
            kind: s3
            endpoint: "{s3.endpoint}"
            bucket: {s3.bucket}
            prefix: scale/
            access_key_id: {s3.access_key}
            secret_access_key: {s3.secret_key}
        engine: {{prefill_tokens_per_s: 100}}
        telemetry: {{prometheus_port: 0}}
        policy:
          default: {{read: [shared], write: [shared]}}
          rules:
            - {{name: via-shared, match: {{hints: {{tier: shared}}}},
               route: {{read: [shared], write: [shared]}}}}
            - {{name: via-cold, match: {{hints: {{tier: cold}}}},
               route: {{read: [cold], write: [cold]}}}}
        """)


class Engine:
    """One engine process driven over stdin/stdout (one JSON command, one RESULT line)."""

    def __init__(self, script: Path, model: Path, config: Path, log: Path, cpu: str):
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=cpu)
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(model), str(config), json.dumps(PROMPTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.log_path = log
        self.ready = self._reply("READY ")

    def _reply(self, prefix: str = "RESULT "):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise AssertionError(
            f"engine exited ({self.proc.wait()}); log tail:\n"
            f"{self.log_path.read_text(errors='replace')[-3000:]}"
        )

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def both(a: Engine, b: Engine, cmd_a: dict, cmd_b: dict) -> tuple[dict, dict]:
    """Send one command to each engine and wait for both: the two run at the same time."""
    out: dict = {}
    threads = [
        threading.Thread(target=lambda k=k, e=e, c=c: out.__setitem__(k, e.ask(**c)))
        for k, e, c in (("a", a, cmd_a), ("b", b, cmd_b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out["a"], out["b"]


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "kvstrata.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return done


def owner(client: redis.Redis, name: str) -> int:
    slot = int(client.cluster("keyslot", name))
    return next(int(m[1]) for lo, hi, m, *_ in client.cluster("slots") if lo <= slot <= hi)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # a long node timeout: no failover while the test looks at a dead master's slots
    c = svc.start_redis_cluster(tmp_path_factory.mktemp("scale-cluster"), node_timeout_ms=20000)
    yield c
    c.stop()


def test_two_concurrent_engines_share_one_redis_cluster_and_one_s3(
    cluster, s3_server, tmp_path
) -> None:
    model = prepare_smollm2(progress=False)
    config = tmp_path / "strata.yaml"
    config.write_text(strata_yaml(cluster.url, s3_server))
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    a = b = None
    try:
        a = Engine(script, model, config, tmp_path / "a.log", "0")
        b = Engine(script, model, config, tmp_path / "b.log", "1")
        ids = a.ready["ids"]
        assert ids == b.ready["ids"]

        one_a, one_b = both(
            a,
            b,
            {"op": "generate", "names": ["c", "a0", "a1"]},
            {"op": "generate", "names": ["c", "b0", "b1"]},
        )
        produced = {
            **{n: r["tokens"] for n, r in one_a["results"].items()},
            **{n: r["tokens"] for n, r in one_b["results"].items() if n != "c"},
        }
        assert one_b["results"]["c"]["tokens"] == produced["c"]  # both wrote c, same answer

        # a third process asks engine B's exporter what it would load for A's prompt
        (tmp_path / "a0.json").write_text(json.dumps(ids["a0"]))
        hint = json.loads(
            cli(
                "lookup",
                "--url",
                b.ready["url"],
                "--tokens-file",
                str(tmp_path / "a0.json"),
                "--param",
                "tier=cold",
                "--json",
            ).stdout
        )
        assert [(t["tier"], t["tokens"]) for t in hint["tiers"]] == [("cold", HIT)]

        two_a, two_b = both(
            a,
            b,
            {"op": "generate", "names": ["b0", "b1", "c"]},
            {"op": "generate", "names": ["a0", "a1", "c"]},
        )
        assert two_b["results"]["a0"]["loaded"] == hint["plan"]["tokens"] == {"cold": HIT}
        could = hit = 0
        for results in (two_a["results"], two_b["results"]):
            for name, r in results.items():
                tier = PROMPTS[name][1]
                could += HIT
                hit += r["loaded"].get(tier, 0)
                assert r["tokens"] == produced[name], name  # the producer's greedy tokens
        print(f"phase 2: {hit}/{could} prefix tokens of the other engine loaded")
        assert hit >= 0.9 * could
        assert (
            one_a["bad_objects"]
            == one_b["bad_objects"]
            == two_a["bad_objects"]
            == two_b["bad_objects"]
            == 0
        )

        # kill the master holding a1's chunk 1: a1's prefix now stops at its first chunk there
        names = b.ask(op="keys", name="a1")[: HIT // CHUNK]
        client = redis.Redis(host="127.0.0.1", port=cluster.master_ports()[0])
        owners = [owner(client, n) for n in names]
        victim = owners[1]
        cut = owners.index(victim)
        print(f"killed master {victim}: a1's chunks on masters {owners}, prefix cut at chunk {cut}")
        cluster.kill_master(victim)
        (tmp_path / "a1.json").write_text(json.dumps(ids["a1"]))
        hint = json.loads(
            cli(
                "lookup",
                "--url",
                b.ready["url"],
                "--tokens-file",
                str(tmp_path / "a1.json"),
                "--param",
                "tier=shared",
                "--json",
            ).stdout
        )
        expected = {"shared": cut * CHUNK} if cut else {}
        assert hint["plan"]["tokens"] == expected
        three = b.ask(op="generate", names=["a1"])
        assert (
            three["results"]["a1"]["loaded"] == expected
        )  # a miss from the dead master on, no error
        assert three["results"]["a1"]["tokens"] == produced["a1"]
        assert three["bad_objects"] == 0

        # a third process sees both engines' hits in one table
        stats = cli("stats", "--url", a.ready["url"], "--url", b.ready["url"]).stdout
        loaded = {"shared": 0, "cold": 0}
        for results in (two_a["results"], two_b["results"], three["results"]):
            for r in results.values():
                for tier, n in r["loaded"].items():
                    loaded[tier] += n
        for tier, n in loaded.items():
            row = next(line for line in stats.splitlines() if line.split()[:1] == [tier])
            assert f"{n:,}" in row, (tier, n, stats)
    finally:
        for engine in (a, b):
            if engine is not None:
                engine.close()
