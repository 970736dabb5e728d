"""The work of tools/gpu/device-run.sh (read it first: it holds every limit this file runs under).

Stages: preflight, GPU tests one process per class, memcheck reruns, benches, kernel report. Everything a stage writes
goes under a results folder that is packed into OUT/results.tgz, with OUT/summary.json and OUT/summary.txt, after every
stage and at exit. Python 3.8+, standard library only (the GPU server's image has no .NET; the bundle brings its own).
"""

import collections
import datetime
import io
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

START = time.monotonic()
TRX_NS = "{http://microsoft.com/schemas/VisualStudio/TeamTest/2010}"
# Outcomes in a TRX report. MSTest writes Inconclusive as NotExecuted; a test that hit its timeout is Failed or Timeout.
PASSED = {"Passed"}
FAILED = {"Failed", "Error", "Timeout", "Aborted"}
# Classes that need the most of the device or many ranks run last, in this order; every other class runs first in the
# order of FIRST (a class named in neither runs after FIRST's, by name). A fault late in the run then costs least, so
# what no GPU has confirmed yet (BF16 activation storage, the tensor-core BF16 GEMM, the Hopper GEMMs) comes at the very end.
FIRST = ["KernelGpuTests", "Bf16GemmGpuTests", "Fp8GemmGpuTests", "MoeGateGpuTests", "MoeDispatchGpuTests",
         "MoeGroupedGemmGpuTests", "MlaGpuTests", "MlaPrefillGpuTests", "CublasGpuTests", "WeightUploadGpuTests"]
LAST = ["CudaBackendGpuTests", "AllReduceGpuTests", "CudaModelGpuTests", "PagedStepRunnerGpuTests", "CudaParallelGpuTests",
        "LocalModelDevicesGpuTests", "CudaBackendBf16ActivationsGpuTests",
        "Bf16MmaGpuTests", "MoeGateTensorCoreGpuTests", "Fp8WgmmaGpuTests", "MoeWgmmaGpuTests"]
EXIT_OK, EXIT_FAILED, EXIT_NO_DEVICE = 0, 1, 3


def limit(name):
    """A limit from device-run.sh's environment (seconds or counts); there is no second copy of them here."""
    value = os.environ.get("DSCUDA_" + name)
    if value is None:
        sys.exit(f"device_run.py: DSCUDA_{name} is not set; run tools/gpu/device-run.sh, which sets every limit")
    return int(value)


def now():
    return time.monotonic() - START


def utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def first_line(text, width=300):
    """The first non-blank line, without the "Looked in:" that introduces the engine's list of searched folders."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            line = re.sub(r"\.?\s*Looked in:$", "", line)
            return line[:width]
    return ""


def log(message):
    print(f"[{now():5.0f} s] {message}", flush=True)


class Run:
    def __init__(self, out):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.bundle = os.path.abspath(os.environ.get("DSCUDA_BUNDLE") or os.path.join(repo, "gpu-bundle"))
        self.work = tempfile.mkdtemp(prefix="dscuda-device-run-")
        self.results = os.path.join(self.work, "results")
        os.makedirs(self.results)
        self.scratch = os.path.join(self.work, "scratch")  # synthetic checkpoints of the benches; never packed
        os.makedirs(self.scratch)
        self.has_device = False
        self.inconclusive = collections.defaultdict(list)  # class -> Inconclusive messages (grouped into the summary)
        self.deadline = limit("DEADLINE_S")
        self.reserve = limit("RESERVE_S")
        self.tests_exe = os.path.join(self.bundle, "tests", "DeepSeekCuda.Tests")
        self.bench_exe = os.path.join(self.bundle, "bench", "run-bench")
        commit_file = os.path.join(self.bundle, "COMMIT")
        self.commit = open(commit_file).read().split() if os.path.exists(commit_file) else ["unknown"]
        self.env = dict(os.environ)
        self.env.update({
            "DSCUDA_SHARED": os.path.join(self.bundle, "shared"),
            "DSCUDA_KERNEL_CACHE": os.path.join(self.work, "kernel-cache"),  # shared by every process of the run
            "DSCUDA_COMMIT": self.commit[0][:12],
            "DSCUDA_E2E_DIR": self.scratch,
            "DSCUDA_LOAD_BENCH_DIR": self.scratch,
            "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "32"),
            "DOTNET_CLI_TELEMETRY_OPTOUT": "1",
            "TMPDIR": self.scratch,
        })
        self.summary = {
            "schema": 1,
            "commit": " ".join(self.commit),
            "date": utc(),
            "host": os.uname().nodename,
            "bundle": self.bundle,
            "deadline_s": self.deadline,
            "elapsed_s": 0,
            "device_ran": False,
            "exit_code": None,
            "verdict": "",
            "preflight": None,
            "library_fallback": None,
            "tests": {"classes": [], "totals": {}},
            "inconclusive_reasons": [],
            "sanitizer": [],
            "benches": [],
            "kernels": None,
            "stages": [],
            "notes": [],
        }

    # ---------------------------------------------------------------- processes

    def left(self, until=None):
        """Seconds left before `until` (seconds after start; default: the deadline less the packing reserve)."""
        end = self.deadline - self.reserve if until is None else min(until, self.deadline - self.reserve)
        return end - now()

    def call(self, args, log_path, timeout):
        """Runs args in its own process group, output to log_path; kills the group at timeout. (rc, seconds, timed_out)."""
        started = time.monotonic()
        with open(log_path, "ab") as sink:
            sink.write(("$ " + " ".join(args) + "\n").encode())
            sink.flush()
            try:
                p = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                     start_new_session=True)
            except OSError as e:
                sink.write(f"could not start: {e}\n".encode())
                return 127, 0.0, False
            try:
                rc = p.wait(timeout=max(1, timeout))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                rc = p.returncode if p.returncode is not None else -9
                sink.write(f"\n[device-run] killed after {timeout:.0f} s (its timeout)\n".encode())
        return rc, time.monotonic() - started, timed_out

    def stage(self, name, body):
        started = now()
        log(f"stage {name}")
        try:
            body()
        except Exception as e:  # a bug here must not cost the rest of the run its summary
            self.summary["notes"].append(f"stage {name} raised {type(e).__name__}: {e}")
            log(f"stage {name} raised {type(e).__name__}: {e}")
        self.summary["stages"].append({"name": name, "started_s": round(started, 1), "seconds": round(now() - started, 1)})
        self.pack()

    # ---------------------------------------------------------------- stage 1: preflight

    def environment(self):
        lines = [f"date: {utc()}", f"uname: {' '.join(os.uname())}", f"python: {sys.version.split()[0]} ({sys.executable})"]
        for var in ("LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "PATH", "VIRTUAL_ENV", "CONDA_PREFIX"):
            lines.append(f"{var}={os.environ.get(var, '')}")
        for tool in ("nvidia-smi", "compute-sanitizer", "cuobjdump", "nvcc"):
            lines.append(f"{tool}: {shutil.which(tool) or 'not on PATH'}")
        text = "\n".join(lines) + "\n"
        for args in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem", "--format=csv"],
                     ["sh", "-c", "ldconfig -p | grep -E 'libcuda\\.|libnvrtc|libcublas' || true"]):
            try:
                r = subprocess.run(args, capture_output=True, text=True, timeout=20)
                text += f"\n$ {' '.join(args)}\n{r.stdout}{r.stderr}"
            except (OSError, subprocess.TimeoutExpired) as e:
                text += f"\n$ {' '.join(args)}\n{e}\n"
        with open(os.path.join(self.results, "environment.txt"), "w") as f:
            f.write(text)
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                self.summary["nvidia_smi_driver"] = first_line(r.stdout) or None
            except (OSError, subprocess.TimeoutExpired):
                pass

    def wheel_folders(self):
        """NVIDIA's pip wheels under this Python's site-packages that hold NVRTC or cuBLAS (CUDA 13: nvidia/cu13/lib)."""
        roots = []
        try:
            roots += site.getsitepackages()
        except AttributeError:
            pass
        try:
            roots.append(site.getusersitepackages())
        except AttributeError:
            pass
        found = []
        for root in roots:
            nvidia = os.path.join(root, "nvidia")
            if not os.path.isdir(nvidia):
                continue
            for sub in sorted(os.listdir(nvidia)):
                lib = os.path.join(nvidia, sub, "lib")
                if os.path.isdir(lib) and any(n.startswith(("libnvrtc.so", "libcublas")) for n in os.listdir(lib)):
                    found.append(lib)
        # CUDA 13's single folder first, then the per-package CUDA 12 ones.
        return sorted(set(found), key=lambda p: (0 if "/cu13/" in p else 1, p))

    def preflight_once(self, tag):
        path = os.path.join(self.results, "preflight.json")
        if os.path.exists(path):
            os.remove(path)
        timeout = min(limit("PREFLIGHT_S") / 2, self.left())
        rc, seconds, timed_out = self.call([self.bench_exe, "preflight", "--out", self.results],
                                           os.path.join(self.results, f"preflight{tag}.log"), timeout)
        report = None
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
        return {"rc": rc, "seconds": round(seconds, 1), "timed_out": timed_out, "report": report}

    def preflight(self):
        self.environment()
        if not os.path.exists(self.bench_exe) or not os.path.exists(self.tests_exe):
            self.summary["preflight"] = {"ok": False, "problems": [f"no bundle at {self.bundle} (tests/ and bench/ missing): "
                                                                    "run tools/gpu/pack.sh here and carry gpu-bundle.tar.gz"]}
            return
        result = self.preflight_once("")
        report = result["report"] or {}
        missing = [name for name in ("nvrtc", "cublas") if (report.get(name) or {}).get("error")]
        wheels = self.wheel_folders() if missing else []
        if missing and wheels:
            # The system's libraries did not load: NVIDIA's wheels (PyTorch brings them) are the next place.
            self.env["DSCUDA_CUDA_LIB"] = ":".join(wheels)
            self.summary["library_fallback"] = {"missing": missing, "DSCUDA_CUDA_LIB": self.env["DSCUDA_CUDA_LIB"]}
            result = self.preflight_once("-wheels")
            report = result["report"] or {}
        problems = list(report.get("problems", []))
        if result["report"] is None:
            problems.append(f"run-bench preflight wrote no report (exit {result['rc']}{', timed out' if result['timed_out'] else ''}); see preflight.log")
        devices = report.get("devices") or []
        self.summary["preflight"] = {
            "ok": not problems,
            "problems": problems,
            "rc": result["rc"],
            "seconds": result["seconds"],
            "devices": devices,
            "driver": report.get("driver"),
            "driver_cuda": report.get("driver_cuda"),
            "nvrtc": report.get("nvrtc"),
            "cublas": report.get("cublas"),
            "cublas_lt": report.get("cublas_lt"),
            "smoke": report.get("smoke", []),
        }
        self.has_device = bool(devices)

    # ---------------------------------------------------------------- stage 2: tests

    def discover(self):
        """GPU test classes, in run order, with their tests' display names (from the runner's own JSON listing)."""
        listing = os.path.join(self.results, "tests", "list.json")
        with open(listing, "w") as sink:
            r = subprocess.run([self.tests_exe, "--list-tests", "json", "--filter", "TestCategory=Gpu", "--no-ansi"],
                               stdout=sink, stderr=subprocess.PIPE, env=self.env, cwd=self.work, timeout=120, text=True)
        text = open(listing).read()
        start = text.find("{")
        if r.returncode != 0 or start < 0:
            raise RuntimeError(f"test listing failed (exit {r.returncode}): {first_line(r.stderr)}")
        classes = collections.OrderedDict()
        for test in json.loads(text[start:])["tests"]:
            t = test["type"]
            classes.setdefault((t["namespace"], t["typeName"]), []).append(test["displayName"])

        def rank(key):
            name = key[1]
            if name in LAST:
                return (2, LAST.index(name), name)
            return (0, FIRST.index(name), name) if name in FIRST else (1, 0, name)
        return [(ns, name, classes[(ns, name)]) for ns, name in sorted(classes, key=rank)]

    @staticmethod
    def read_trx(path):
        results = []
        root = ET.parse(path).getroot()
        for r in root.iter(TRX_NS + "UnitTestResult"):
            message = r.find(f"{TRX_NS}Output/{TRX_NS}ErrorInfo/{TRX_NS}Message")
            results.append({"test": r.get("testName"), "outcome": r.get("outcome"),
                            "message": message.text if message is not None and message.text else "",
                            "seconds": duration(r.get("duration"))})
        return results

    @staticmethod
    def finished_in_log(path):
        """Display names the runner reported finished in its console log (for a process killed before its TRX)."""
        done = set()
        pattern = re.compile(r"^\s*(passed|failed|skipped|error|timed out|cancelled)\s+(.+?)\s+\([^()]*\)\s*$")
        with open(path, errors="replace") as f:
            for line in f:
                m = pattern.match(line)
                if m:
                    done.add(m.group(2))
        return done

    def tests(self):
        os.makedirs(os.path.join(self.results, "tests"), exist_ok=True)
        config = os.path.join(self.work, "testconfig.json")
        with open(config, "w") as f:
            # Per-test timeout, non-cooperative: a test stuck in a native call is abandoned, not waited for.
            json.dump({"mstest": {"timeout": {"test": limit("TEST_S") * 1000, "useCooperativeCancellation": False}}}, f)
        until = limit("TESTS_UNTIL_S")
        classes = self.discover()
        self.summary["tests"]["discovered"] = sum(len(t) for _, _, t in classes)
        for ns, name, tests in classes:
            entry = {"class": name, "namespace": ns, "tests": len(tests), "passed": 0, "failed": 0, "inconclusive": 0,
                     "not_run": 0, "seconds": 0.0, "status": "", "failures": [], "note": ""}
            self.summary["tests"]["classes"].append(entry)
            timeout = min(limit("CLASS_S"), self.left(until))
            if timeout < min(10, limit("CLASS_S")):
                entry.update(status="not-run", not_run=len(tests), note="the test stage's deadline passed before it")
                continue
            trx = os.path.join(self.results, "tests", name + ".trx")
            logfile = os.path.join(self.results, "tests", name + ".log")
            # The runner's own session timeout comes first, so that it can still write its TRX report; the kill is the backstop.
            session = max(5, int(timeout) - 10)
            args = [self.tests_exe, "--filter", f"TestCategory=Gpu&ClassName={ns}.{name}", "--report-trx", "--report-trx-filename", trx,
                    "--results-directory", os.path.join(self.results, "tests"), "--config-file", config, "--no-ansi",
                    "--progress", "off", "--output", "Detailed", "--timeout", f"{session}s"]
            log(f"tests {name} ({len(tests)}, up to {timeout:.0f} s)")
            rc, seconds, timed_out = self.call(args, logfile, timeout)
            timed_out = timed_out or (rc != 0 and seconds >= session)
            entry["seconds"] = round(seconds, 1)
            entry["rc"] = rc
            self.score(entry, tests, trx, logfile, rc, timed_out)
            log(f"  {entry['status']}: {entry['passed']} passed, {entry['failed']} failed, {entry['inconclusive']} inconclusive, "
                f"{entry['not_run']} not run, {seconds:.0f} s")
            self.tally()
            self.pack()
        self.tally()

    def score(self, entry, tests, trx, logfile, rc, timed_out):
        results = self.read_trx(trx) if os.path.exists(trx) else []
        for r in results:
            if r["outcome"] in PASSED:
                entry["passed"] += 1
            elif r["outcome"] in FAILED:
                entry["failed"] += 1
                entry["failures"].append({"test": r["test"], "message": first_line(r["message"]) or r["outcome"]})
            else:
                entry["inconclusive"] += 1
                self.inconclusive[entry["class"]].append(r["message"])
        if results:
            entry["not_run"] = max(0, len(tests) - len(results))
        else:
            finished = self.finished_in_log(logfile)
            unfinished = [t for t in tests if t not in finished]
            entry["not_run"] = len(unfinished)
            if unfinished:
                entry["first_unfinished"] = unfinished[0]
            entry["note"] = (f"no TRX report: the process {'was killed at its timeout' if timed_out else f'exited {rc}'}; "
                             f"{len(tests) - len(unfinished)} of {len(tests)} tests finished by its log"
                             + (f", first unfinished: {unfinished[0]}" if unfinished else ""))
        if timed_out:
            entry["status"] = "timeout"
        elif not results:
            entry["status"] = "crashed"
        elif entry["failed"]:
            entry["status"] = "failed"
        elif entry["passed"] == 0:
            entry["status"] = "inconclusive"
        else:
            entry["status"] = "ok" if entry["inconclusive"] == 0 and entry["not_run"] == 0 else "partial"
        if entry["status"] in ("timeout", "crashed", "failed"):
            culprit = entry["failures"][0]["test"] if entry["failures"] else entry.get("first_unfinished")
            entry["culprit"] = culprit

    def tally(self):
        classes = self.summary["tests"]["classes"]
        totals = {k: sum(c[k] for c in classes) for k in ("tests", "passed", "failed", "inconclusive", "not_run")}
        totals["classes"] = len(classes)
        self.summary["tests"]["totals"] = totals
        groups = collections.OrderedDict()
        for c in classes:
            for message in self.inconclusive[c["class"]]:
                reason = inconclusive_reason(message)
                g = groups.setdefault(reason, {"reason": reason, "count": 0, "classes": []})
                g["count"] += 1
                if c["class"] not in g["classes"]:
                    g["classes"].append(c["class"])
            if c["status"] == "not-run":
                reason = "not run: " + c["note"]
                g = groups.setdefault(reason, {"reason": reason, "count": 0, "classes": []})
                g["count"] += c["not_run"]
                g["classes"].append(c["class"])
        self.summary["inconclusive_reasons"] = sorted(groups.values(), key=lambda g: -g["count"])
        self.summary["device_ran"] = totals["passed"] + totals["failed"] > 0

    # ---------------------------------------------------------------- stage 3: memcheck

    def sanitizer(self):
        # Faults, not hangs: a class killed at its timeout, or a culprit that hit the per-test timeout, would only hang again.
        faulting = [c for c in self.summary["tests"]["classes"] if c.get("culprit") and c["status"] in ("failed", "crashed")
                    and not any(f["test"] == c["culprit"] and "timed out" in f["message"] for f in c["failures"])]
        if not faulting:
            return
        tool = shutil.which("compute-sanitizer") or next(
            (p for p in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer") if os.path.exists(p)), None)
        os.makedirs(os.path.join(self.results, "sanitizer"), exist_ok=True)
        for c in faulting[:limit("SANITIZER_CLASSES")]:
            entry = {"class": c["class"], "test": c["culprit"], "status": "", "errors": None, "seconds": 0.0}
            self.summary["sanitizer"].append(entry)
            timeout = min(limit("SANITIZER_S"), self.left(limit("TESTS_UNTIL_S")))
            if tool is None:
                entry["status"] = "no compute-sanitizer on this machine"
                continue
            if timeout < min(20, limit("SANITIZER_S")):
                entry["status"] = "not run: the test stage's deadline passed"
                continue
            method = c["culprit"].split(" (")[0]  # a data row's display name is "Method (args)": take every row of it
            report = os.path.join(self.results, "sanitizer", c["class"] + ".txt")
            args = [tool, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20", "--log-file", report, self.tests_exe,
                    "--filter", f"FullyQualifiedName={c['namespace']}.{c['class']}.{method}", "--no-ansi", "--progress", "off"]
            log(f"memcheck {c['class']}.{method} (up to {timeout:.0f} s)")
            rc, seconds, timed_out = self.call(args, os.path.join(self.results, "sanitizer", c["class"] + ".log"), timeout)
            entry["seconds"] = round(seconds, 1)
            entry["rc"] = rc
            text = open(report, errors="replace").read() if os.path.exists(report) else ""
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            entry["errors"] = int(m.group(1)) if m else None
            first_error = next((line.strip() for line in text.splitlines()
                                if ("Invalid" in line or "Error" in line) and "ERROR SUMMARY" not in line), "")
            entry["first_error"] = first_error[:300]
            entry["status"] = "timeout" if timed_out else ("errors" if entry["errors"] else ("clean" if m else f"exit {rc}, no summary"))
            self.pack()

    # ---------------------------------------------------------------- stage 4: benches, then the kernel report

    def benches(self):
        os.makedirs(os.path.join(self.results, "bench"), exist_ok=True)
        r = subprocess.run([self.bench_exe, "list"], capture_output=True, text=True, env=self.env, timeout=60)
        names = r.stdout.split()
        if r.returncode != 0 or not names:
            raise RuntimeError(f"run-bench list failed (exit {r.returncode}): {first_line(r.stderr)}")
        for name in names:
            entry = {"name": name, "status": "", "rows": 0, "seconds": 0.0, "error": None}
            self.summary["benches"].append(entry)
            timeout = min(limit("BENCH_S"), self.left())
            if timeout < min(10, limit("BENCH_S")):
                entry["status"] = "not run: the deadline passed"
                continue
            log(f"bench {name} (up to {timeout:.0f} s)")
            rc, seconds, timed_out = self.call([self.bench_exe, name, "--quick", "--out", os.path.join(self.results, "bench")],
                                               os.path.join(self.results, "bench", name + ".log"), timeout)
            entry.update(rc=rc, seconds=round(seconds, 1))
            path = os.path.join(self.results, "bench", name + ".json")
            data = None
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
                entry["rows"] = len(data.get("results", []))
                entry["error"] = first_line(data.get("error"))
            entry["status"] = ("timeout" if timed_out else "no JSON written" if data is None else
                               "no device" if rc == 2 else "failed" if rc != 0 or entry["error"] else "ok")
            log(f"  {entry['status']}: {entry['rows']} rows, {seconds:.0f} s")
            self.pack()

    def kernels(self):
        entry = {"status": "", "seconds": 0.0}
        self.summary["kernels"] = entry
        if not getattr(self, "has_device", False):
            entry["status"] = "skipped: no device (it needs only NVRTC and cuobjdump, which CI's Nvrtc tests cover with NVRTC 12.4)"
            return
        timeout = min(limit("KERNELS_S"), self.left())
        if timeout < min(20, limit("KERNELS_S")):
            entry["status"] = "not run: the deadline passed"
            return
        folder = os.path.join(self.results, "kernels")
        os.makedirs(folder, exist_ok=True)
        log(f"kernel report sm_90a (up to {timeout:.0f} s)")
        rc, seconds, timed_out = self.call([self.bench_exe, "kernels", "--arch", "sm_90a", "--out", folder],
                                           os.path.join(folder, "kernels.log"), timeout)
        entry.update(rc=rc, seconds=round(seconds, 1),
                     status="timeout" if timed_out else {0: "gate passed", 1: "gate failed (see kernels.log)"}.get(rc, f"could not run (exit {rc})"))

    # ---------------------------------------------------------------- results

    def verdict(self):
        s = self.summary
        totals = s["tests"]["totals"]
        if not s["device_ran"]:
            reason = (s["preflight"] or {}).get("problems") or ["no test passed or failed on a device"]
            return EXIT_NO_DEVICE, "nothing ran on a device: " + first_line(reason[0])
        bad = [c["class"] for c in s["tests"]["classes"] if c["status"] in ("failed", "timeout", "crashed")]
        bad_benches = [b["name"] for b in s["benches"] if b["status"] not in ("ok",)]
        if bad or bad_benches or totals.get("not_run"):
            parts = []
            if bad:
                parts.append(f"{len(bad)} test class(es) failed ({', '.join(bad)})")
            if totals.get("not_run"):
                parts.append(f"{totals['not_run']} test(s) not run")
            if bad_benches:
                parts.append(f"bench(es) not ok: {', '.join(bad_benches)}")
            return EXIT_FAILED, "; ".join(parts)
        return EXIT_OK, f"{totals['passed']} tests passed on the device, every bench ran"

    def pack(self, final=False):
        s = self.summary
        s["elapsed_s"] = round(now(), 1)
        if final:
            s["exit_code"], s["verdict"] = self.verdict()
        tests_json = {k: s[k] for k in ("commit", "date", "host")}
        tests_json.update(device=(s.get("preflight") or {}).get("devices"), driver=s.get("nvidia_smi_driver"),
                          nvrtc=((s.get("preflight") or {}).get("nvrtc") or {}).get("version"), **s["tests"])
        with open(os.path.join(self.results, "gpu-tests.json"), "w") as f:
            json.dump(tests_json, f, indent=2)
        text = render(s)
        write_atomic(os.path.join(self.out, "summary.json"), json.dumps(s, indent=2).encode())
        write_atomic(os.path.join(self.out, "summary.txt"), text.encode())
        write_atomic(os.path.join(self.out, "results.tgz"), tarball(self.results, limit("OUT_MAX_FILE_MIB") << 20))
        return text

    def interrupted(self, signum, _frame):
        """SIGTERM or SIGINT (a kill the device tool gives time for): pack what ran, then stop."""
        self.summary["notes"].append(f"stopped by signal {signum} after {now():.0f} s")
        print("\n" + self.pack(final=True), flush=True)
        os._exit(EXIT_FAILED if self.summary["device_ran"] else EXIT_NO_DEVICE)

    def main(self):
        signal.signal(signal.SIGTERM, self.interrupted)
        signal.signal(signal.SIGINT, self.interrupted)
        log(f"device run: bundle {self.bundle}, commit {' '.join(self.commit)}, deadline {self.deadline} s, work {self.work}")
        self.stage("preflight", self.preflight)
        if os.path.exists(self.tests_exe):
            self.stage("tests", self.tests)
            self.stage("sanitizer", self.sanitizer)
        if os.path.exists(self.bench_exe):
            self.stage("benches", self.benches)
            self.stage("kernels", self.kernels)
        text = self.pack(final=True)
        check_out(self.out)
        print("\n" + text, flush=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.summary["exit_code"]


def duration(text):
    """TRX duration hh:mm:ss.fffffff in seconds."""
    m = re.match(r"(\d+):(\d+):(\d+(?:\.\d+)?)", text or "")
    return round(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)), 3) if m else 0.0


def inconclusive_reason(message):
    """The reason of an Inconclusive message without MSTest's wrapper, first line only."""
    text = message or "no message"
    text = re.sub(r"^.*?threw exception\. ", "", text, flags=re.S)
    text = re.sub(r"^Assert\.Inconclusive( failed)?\.\s*", "", text)
    return first_line(text, 240) or "no message"


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def tarball(folder, max_bytes):
    """folder as a .tgz under max_bytes: files are cut to their head and tail, largest first, until it fits."""
    cap = None
    while True:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for base, _, files in os.walk(folder):
                for name in sorted(files):
                    path = os.path.join(base, name)
                    arcname = os.path.relpath(path, folder)
                    size = os.path.getsize(path)
                    if cap is not None and size > cap:
                        with open(path, "rb") as f:
                            head = f.read(cap // 4)
                            f.seek(size - (cap - cap // 4))
                            tail = f.read()
                        data = head + f"\n[... {size - cap} bytes cut to fit the returned file's limit ...]\n".encode() + tail
                        info = tarfile.TarInfo(arcname)
                        info.size = len(data)
                        info.mtime = int(time.time())
                        tar.addfile(info, io.BytesIO(data))
                    else:
                        tar.add(path, arcname)
        data = buffer.getvalue()
        if len(data) <= max_bytes:
            return data
        cap = (cap or max_bytes) // 2
        if cap < 4096:
            return data


def check_out(out):
    """Holds OUT to what the device tool returns; says so loudly if this script ever breaks it."""
    problems = []
    files = []
    for base, dirs, names in os.walk(out):
        depth = os.path.relpath(base, out).count(os.sep) + (0 if base == out else 1)
        for name in names:
            path = os.path.join(base, name)
            files.append(path)
            if depth > limit("OUT_MAX_DEPTH"):
                problems.append(f"{path}: deeper than {limit('OUT_MAX_DEPTH')} folders")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
                problems.append(f"{path}: name outside letters, digits, '.', '_', '-'")
            if os.path.getsize(path) > limit("OUT_MAX_FILE_MIB") << 20:
                problems.append(f"{path}: over {limit('OUT_MAX_FILE_MIB')} MiB")
    if len(files) > limit("OUT_MAX_FILES"):
        problems.append(f"{len(files)} files in OUT, over {limit('OUT_MAX_FILES')}")
    if sum(os.path.getsize(f) for f in files) > limit("OUT_MAX_TOTAL_MIB") << 20:
        problems.append(f"OUT over {limit('OUT_MAX_TOTAL_MIB')} MiB")
    for p in problems:
        print(f"device-run: OUT breaks the device tool's limits: {p}", file=sys.stderr)


def render(s):
    pre = s.get("preflight") or {}
    lines = [f"DeepSeekCuda device run: commit {s['commit']}, {s['date']}, {s['elapsed_s']:.0f} s of {s['deadline_s']} s, host {s['host']}"]
    devices = pre.get("devices") or []
    if devices:
        for d in devices:
            lines.append(f"device:    {d['ordinal']}: {d['name']} {d['arch']}, {d['multiprocessors']} SMs, {d['memory_mib']} MiB, "
                         f"target {d.get('target')}; driver {s.get('nvidia_smi_driver') or '?'} (CUDA {pre.get('driver_cuda') or '?'})")
    else:
        lines.append("device:    none")

    def lib(name, key):
        found = pre.get(key)
        if not found:
            where = "not checked"
        elif found.get("path"):
            where = f"{found['path']} ({found.get('version') or 'version unknown'})"
        else:
            where = "not found: " + first_line(found.get("error"), 160)
        lines.append(f"{name:<10} {where}")
    lib("driver:", "driver")
    lib("nvrtc:", "nvrtc")
    lib("cublas:", "cublas")
    if s.get("library_fallback"):
        lines.append(f"libraries: {', '.join(s['library_fallback']['missing'])} not in the system folders; "
                     f"DSCUDA_CUDA_LIB={s['library_fallback']['DSCUDA_CUDA_LIB']}")
    for step in pre.get("smoke") or []:
        lines.append(f"smoke:     {'ok  ' if step['ok'] else 'FAIL'} {step['step']} ({step['ms']:.0f} ms): {first_line(step['detail'], 160)}")
    lines.append("preflight: " + ("ok" if pre.get("ok") else "; ".join(first_line(p, 200) for p in pre.get("problems") or ["not run"])))

    t = s["tests"]
    totals = t.get("totals") or {}
    lines.append("")
    lines.append(f"tests: {totals.get('tests', 0)} in {totals.get('classes', 0)} classes: {totals.get('passed', 0)} passed, "
                 f"{totals.get('failed', 0)} failed, {totals.get('inconclusive', 0)} inconclusive, {totals.get('not_run', 0)} not run")
    if t["classes"]:
        lines.append(f"  {'class':<26} {'tests':>5} {'pass':>5} {'fail':>5} {'inc':>5} {'n/r':>5} {'time':>6}  status")
        for c in t["classes"]:
            lines.append(f"  {c['class']:<26} {c['tests']:>5} {c['passed']:>5} {c['failed']:>5} {c['inconclusive']:>5} {c['not_run']:>5} "
                         f"{c['seconds']:>5.0f}s  {c['status']}{' (' + c['note'] + ')' if c['note'] else ''}")
    failures = [(c["class"], f) for c in t["classes"] for f in c["failures"]]
    if failures:
        lines.append("failures (first line of each):")
        for cls, f in failures[:60]:
            lines.append(f"  {cls}.{f['test']}: {f['message']}")
        if len(failures) > 60:
            lines.append(f"  ... {len(failures) - 60} more in summary.json")
    if s["inconclusive_reasons"]:
        lines.append("inconclusive or not run, by reason:")
        for g in s["inconclusive_reasons"]:
            lines.append(f"  {g['count']:>4} x {g['reason']} [{', '.join(g['classes'])}]")
    if s["sanitizer"]:
        lines.append("memcheck:")
        for e in s["sanitizer"]:
            lines.append(f"  {e['class']}.{e['test']}: {e['status']}{'; ' + e['first_error'] if e.get('first_error') else ''}")
    if s["benches"]:
        lines.append("")
        lines.append("benches (quick):")
        for b in s["benches"]:
            lines.append(f"  {b['name']:<12} {b['status']:<10} {b['rows']:>3} rows {b['seconds']:>5.0f}s"
                         f"{'  ' + first_line(b['error'], 160) if b.get('error') else ''}")
    if s.get("kernels"):
        lines.append(f"kernel report (sm_90a, this NVRTC): {s['kernels']['status']}")
    for note in s["notes"]:
        lines.append(f"note: {note}")
    if s.get("exit_code") is not None:
        lines.append("")
        lines.append(f"exit {s['exit_code']}: {s['verdict']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bash tools/gpu/device-run.sh OUTDIR")
    sys.exit(Run(sys.argv[1]).main())
