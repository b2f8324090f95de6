"""A real ComfyUI 0.3.75 server, headless, in a subprocess, with this pack and the test kit loaded.

    with ComfyServer() as server:
        reply = server.post_prompt(workflow)          # the JSON body, 400 validation errors included
        entry = server.wait_history(reply["prompt_id"], timeout=120)

The server runs `<repo>/.venv/bin/python <comfy>/main.py --cpu --disable-api-nodes --listen
127.0.0.1 --port <free port> --base-directory <tmp>`, where <tmp>/custom_nodes links the repository
(as `comfyui-exact-encode`) and tests/support/testkit (as `exact-encode-testkit`: the loader for
the shared test VAEs), and <tmp>/input holds a copy of a test photo for LoadImage. Its database
lives in <tmp> too, so the ComfyUI tree is never written to. Standard library only; all traffic
goes to 127.0.0.1 (proxies from the environment are ignored). The log is kept in a temp file.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .host import comfy_dir, link_pack
from .paths import ENV_VAR, REPO, require, shared_dir

TESTKIT = Path(__file__).resolve().parent / "testkit"
TESTKIT_NAME = "exact-encode-testkit"
DEFAULT_IMAGE = "images/astronaut.png"  # under the shared folder
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def venv_python() -> Path:
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        raise ServerError(f"no virtual env at {python.parent.parent}: run scripts/setup_env.sh first")
    return python


class ComfyServer:
    """Starts on `start()` / `with`, stops on `stop()`, on leaving the `with`, or at interpreter exit."""

    def __init__(self, image: str | os.PathLike | None = None, startup_timeout: float = 120.0,
                 keep_dir: bool = False, keep_log: bool = False, extra_args: tuple[str, ...] = (),
                 front_end_root: str | os.PathLike | None = None):
        self.image_source = Path(image) if image is not None else require(DEFAULT_IMAGE)
        if not self.image_source.is_file():
            raise FileNotFoundError(f"no image at {self.image_source}")
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir
        self.keep_log = keep_log
        self.failed = False  # set on any ServerError (or by the caller): the log file is then kept
        self._log_cache: str | None = None
        self.extra_args = tuple(extra_args)
        # Another frontend build (its `static` folder, e.g. from `pip install --target`); None: the
        # comfyui-frontend-package installed in .venv.
        self.front_end_root = Path(front_end_root) if front_end_root is not None else None
        self.client_id = uuid.uuid4().hex
        self.base: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix="exact-encode-comfyui-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self._log_file = None
        # No proxies, whatever the environment says: this only ever talks to 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ---- layout -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def image_name(self) -> str:
        """The test photo's file name in the server's input folder (LoadImage's `image`)."""
        return self.image_source.name

    def add_input(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy another image into the input folder; returns its name for LoadImage."""
        name = name or Path(path).name
        shutil.copyfile(path, self.input_dir / name)
        return name

    def _prepare(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="exact-encode-server-"))
        custom_nodes = self.base / "custom_nodes"
        link_pack(custom_nodes)
        (custom_nodes / TESTKIT_NAME).symlink_to(TESTKIT, target_is_directory=True)
        for sub in ("input", "output", "temp", "user", "models"):
            (self.base / sub).mkdir(exist_ok=True)
        shutil.copyfile(self.image_source, self.input_dir / self.image_name)

    def command(self) -> list[str]:
        return [str(venv_python()), str(comfy_dir() / "main.py"), "--cpu", "--disable-api-nodes",
                "--listen", HOST, "--port", str(self.port), "--base-directory", str(self.base),
                "--database-url", f"sqlite:///{self.base / 'comfyui.db'}",
                *(["--front-end-root", str(self.front_end_root)] if self.front_end_root else []), *self.extra_args]

    def _env(self) -> dict:
        env = dict(os.environ)
        if ENV_VAR in env:  # pass it through, made absolute (the server runs in another folder)
            env[ENV_VAR] = str(shared_dir())
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONPATH", None)  # the server must import ComfyUI's own `nodes`, not the repo's
        return env

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self._prepare()
        atexit.register(self.stop)
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            self._log_file = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self.command(), cwd=str(self.base), env=self._env(),
                                         stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait_ready()
                self.failed = False  # an earlier attempt may have lost its port
                return self
            except ServerError:
                port_taken = "address already in use" in self.log_text().lower()
                self._terminate()
                if not port_taken or attempt == 2:
                    self.stop()
                    raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                hint = ""
                if "ModuleNotFoundError" in self.log_text():
                    hint = (" A package is missing from .venv: ComfyUI's server needs more than the "
                            "in-process host (e.g. `requests`); run scripts/setup_env.sh or scripts/demo.sh.")
                raise self._error(f"ComfyUI exited with code {self.proc.returncode} during start-up.{hint} "
                                  f"Log {self.log_path}:\n{self.log_tail()}")
            try:
                with self._opener.open(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        json.loads(r.read())
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, ValueError):
                pass
            time.sleep(0.5)
        raise self._error(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:  # our own session: SIGTERM the server's process group, then SIGKILL if it lingers
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Terminate the server and remove its base folder (unless keep_dir). The log text stays
        readable through log_text(); its file is removed unless keep_log or something failed."""
        self._terminate()
        if self.base is not None and not self.keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)
        if self._log_cache is None and self.log_path.exists():
            self._log_cache = self.log_text()
            if not (self.keep_log or self.failed):
                self.log_path.unlink(missing_ok=True)
        atexit.unregister(self.stop)

    def _error(self, message: str) -> ServerError:
        self.failed = True
        return ServerError(message)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.failed = True  # keep the log of a run that ended in an exception
        self.stop()

    def log_text(self) -> str:
        if self._log_cache is not None:
            return self._log_cache
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP ---------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> tuple[int, object]:
        if self.proc is None:
            raise self._error("the server is not running")
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with self._opener.open(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry ComfyUI's JSON body
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0):
        """GET a JSON endpoint; raises ServerError on an HTTP error status."""
        status, body = self._request(path, timeout=timeout)
        if status >= 400:
            raise self._error(f"GET {path}: HTTP {status}: {body}")
        return body

    def post_prompt(self, workflow: dict) -> dict:
        """Queue an API-format workflow. Returns ComfyUI's JSON reply plus `http_status`: on success
        it holds `prompt_id`; a rejected prompt (HTTP 400) holds `error` and `node_errors`."""
        status, body = self._request("/prompt", {"prompt": workflow, "client_id": self.client_id})
        reply = dict(body) if isinstance(body, dict) else {"body": body}
        reply["http_status"] = status
        return reply

    def wait_history(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.25) -> dict:
        """The /history entry of `prompt_id` once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status") and (entry["status"].get("completed")
                                                  or entry["status"].get("status_str") == "error"):
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise self._error(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            time.sleep(poll)
        raise self._error(f"prompt {prompt_id} did not finish within {timeout:.0f} s; log:\n{self.log_tail()}")

    def run(self, workflow: dict, timeout: float = 120.0) -> dict:
        """post_prompt + wait_history; raises with the validation errors if the prompt is rejected."""
        reply = self.post_prompt(workflow)
        if reply["http_status"] != 200 or "prompt_id" not in reply:
            raise self._error(f"prompt rejected (HTTP {reply['http_status']}): {json.dumps(reply, indent=1)}")
        return self.wait_history(reply["prompt_id"], timeout)

    def output_files(self, entry: dict, node_id: str) -> list[Path]:
        """The files a SaveImage node (`node_id`) wrote, from its /history outputs."""
        images = entry.get("outputs", {}).get(node_id, {}).get("images", [])
        root = {"output": self.output_dir, "temp": self.base / "temp", "input": self.input_dir}
        return [root[i.get("type", "output")] / i.get("subfolder", "") / i["filename"] for i in images]


def execution_error(entry: dict) -> dict | None:
    """The `execution_error` message of a finished /history entry, if it failed."""
    for event, data in (entry.get("status") or {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


if __name__ == "__main__":  # smoke: start, list the pack's nodes, stop
    with ComfyServer() as s:
        info = s.get("/object_info")
        print({k: info[k]["display_name"] for k in ("VAEExactEncode", "ExactEncodeTestVAELoader")})
    sys.exit(0)
