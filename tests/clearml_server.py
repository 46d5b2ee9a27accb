"""A ClearML server stand-in for the tests: the API server and the file server, in memory, over HTTP.

No ClearML server can run here (it needs MongoDB and Elasticsearch), so the server-mode tests
point the real SDK, the real ``PipelineController`` and a real ``clearml-agent`` at this: one
process, two ``ThreadingHTTPServer``s on 127.0.0.1 (free ports), the ``{"meta", "data"}``
envelope of the real API server, and a file server that takes the SDK's multipart uploads and
serves them back. It models what the SDK and the agent need of a server, not the whole server:
tasks (with hyper-parameters, configurations, artifacts, models and status changes), projects,
queues, models, metric events (the last value of each scalar, as the server keeps it for the
pipeline page) and workers. What it cannot show: the web UI, Docker, authentication (any key
is accepted), a real database (nothing survives the process), the server's validation of every
field.

Every endpoint it does not implement is answered with an error and recorded in ``unknown``, so
a test fails loudly when the SDK starts needing something new. Each connection is closed after
one answer (as gunicorn does): a forked reporter must not share pooled connections with its
parent.
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import jwt

API_VERSION = "2.23"  # the newest the SDK (clearml 2.1.12) knows
USER = {"id": "test-user", "name": "Test User", "company": {"id": "test-company", "name": "test"}}


class ApiError(Exception):
    def __init__(self, code: int, message: str, subcode: int = 0):
        super().__init__(message)
        self.code, self.subcode = code, subcode


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_id() -> str:
    return uuid.uuid4().hex


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _handle(self, method: str) -> None:
        try:
            self.server.owner.handle(self, method)
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-answer (and retries): not ours
            self.close_connection = True
        except Exception as error:  # a fault of the stand-in itself: answered, and kept for the test to see
            self.server.owner.faults.append(f"{method} {self.path}: {type(error).__name__}: {error}")
            self._answer(500, json.dumps({"meta": {"result_code": 500, "result_msg": str(error)}}).encode())

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner):
        super().__init__(("127.0.0.1", 0), Handler)
        self.owner = owner


class FileServer:
    """The file server: ``POST /<folder>/`` with a multipart body whose field name is the path
    below the folder (what the SDK's HTTP driver sends), ``GET`` and ``DELETE`` of a path."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads: list[str] = []
        self.faults: list[str] = []  # the stand-in's own failures

    def handle(self, request: Handler, method: str) -> None:
        path = unquote(urlparse(request.path).path).lstrip("/")
        if ".." in Path(path).parts:
            return request._answer(400, b"bad path")
        if method == "POST":
            body = request._body()
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + request.headers["Content-Type"].encode() + b"\r\n\r\n" + body
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition").lstrip("/")
                target = self.root / path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(part.get_payload(decode=True))
                self.uploads.append(str(target.relative_to(self.root)))
            return request._answer(200, b"{}")
        target = self.root / path
        if method == "GET":
            if not target.is_file():
                return request._answer(404, b"not found", "text/plain")
            return request._answer(200, target.read_bytes(), "application/octet-stream")
        if method == "DELETE":
            target.unlink(missing_ok=True)
            return request._answer(200, b"{}")
        return request._answer(405, b"")


class ApiServer:
    """The API server: ``/[vX.Y/]service.action``, JSON in and ``{"meta", "data"}`` out."""

    def __init__(self):
        self.lock = threading.RLock()
        self.calls: list[tuple[str, object]] = []  # (endpoint, request), in order
        self.unknown: list[str] = []  # endpoints asked for that the stand-in lacks
        self.errors: list[str] = []  # errors answered, as a server answers them (an unknown id, ...)
        self.faults: list[str] = []  # the stand-in's own failures
        self.tasks: dict[str, dict] = {}
        self.projects: dict[str, dict] = {}
        self.queues: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.workers: dict[str, dict] = {}
        self.endpoints: dict[str, Callable[[dict], dict]] = {
            name.replace("__", "."): getattr(self, name)
            for name in dir(self)
            if "__" in name and not name.startswith("_") and callable(getattr(self, name))
        }

    # --- HTTP ---------------------------------------------------------------------------------

    def handle(self, request: Handler, method: str) -> None:
        url = urlparse(request.path)
        endpoint = url.path.strip("/").split("/")[-1]
        body = request._body()
        if endpoint == "events.add_batch":
            payload = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        else:
            payload = json.loads(body) if body.strip() else {}
            for key, values in parse_qs(url.query).items():
                payload.setdefault(key, values[0])
        with self.lock:
            self.calls.append((endpoint, payload))
            handler = self.endpoints.get(endpoint)
            try:
                if handler is None:
                    self.unknown.append(endpoint)
                    raise ApiError(400, f"the stand-in server does not implement {endpoint}", 3)
                data = handler(payload)
                code, subcode, message = 200, 0, "OK"
            except ApiError as error:
                data, code, subcode, message = {}, error.code, error.subcode, str(error)
                self.errors.append(f"{endpoint}: {message}")
        meta = {
            "id": new_id(),
            "trx": new_id(),
            "endpoint": {"name": endpoint, "requested_version": API_VERSION, "actual_version": API_VERSION},
            "result_code": code,
            "result_subcode": subcode,
            "result_msg": message,
            "error_stack": None,
        }
        request._answer(code, json.dumps({"meta": meta, "data": data}).encode())

    # --- the server itself ----------------------------------------------------------------------

    def debug__ping(self, _):
        return {"msg": "ClearML server stand-in"}

    def auth__login(self, _):
        claims = {"api_version": API_VERSION, "server_version": "2.0.0", "env": "test", "exp": time.time() + 86400}
        claims.update(identity={"user": USER["id"], "company": USER["company"]["id"], "role": "admin"})
        return {"token": jwt.encode(claims, "a key only the stand-in server uses", algorithm="HS256")}

    def users__get_current_user(self, _):
        return {"user": USER, "getting_started": {}, "settings": {}}

    def server__info(self, _):
        return {"version": "2.0.0", "build": "stand-in", "api_version": API_VERSION}

    # --- projects -----------------------------------------------------------------------------

    def _project(self, project_id: str) -> dict:
        if project_id not in self.projects:
            raise ApiError(400, f"invalid project id {project_id}", 101)
        return self.projects[project_id]

    def projects__create(self, query):
        if any(p["name"] == query["name"] for p in self.projects.values()):
            raise ApiError(409, f"project {query['name']} exists", 100)
        project = {"id": new_id(), "created": now(), "last_update": now(), "tags": [], "system_tags": []}
        project.update({k: v for k, v in query.items() if k in ("name", "description", "system_tags", "tags")})
        project["default_output_destination"] = query.get("default_output_destination")
        self.projects[project["id"]] = project
        return {"id": project["id"]}

    def projects__get_all(self, query):
        return {"projects": _select(list(self.projects.values()), query, ())}

    projects__get_all_ex = projects__get_all

    def projects__get_by_id(self, query):
        return {"project": copy.deepcopy(self._project(query["project"]))}

    def projects__update(self, query):
        project = self._project(query["project"])
        project.update({k: v for k, v in query.items() if k != "project"})
        return {"updated": 1, "fields": {}}

    # --- tasks --------------------------------------------------------------------------------

    TASK_FIELDS = (
        "name", "type", "comment", "tags", "system_tags", "parent", "project", "script", "execution",
        "hyperparams", "configuration", "models", "container", "runtime", "output_dest", "input",
    )  # fmt: skip

    def _task(self, task_id: str) -> dict:
        if task_id not in self.tasks:
            raise ApiError(400, f"invalid task id {task_id}", 101)
        return self.tasks[task_id]

    def _set_status(self, task: dict, status: str, query: dict, **fields) -> dict:
        task.update(status=status, status_changed=now(), last_update=now(), **fields)
        task["status_reason"] = query.get("status_reason", "")
        task["status_message"] = query.get("status_message", "")
        return {"updated": 1, "fields": {"status": status, **fields}}

    def tasks__create(self, query):
        task = {
            "id": new_id(),
            "user": USER["id"],
            "company": USER["company"]["id"],
            "created": now(),
            "last_update": now(),
            "status": "created",
            "status_changed": now(),
            "tags": [],
            "system_tags": [],
            "execution": {"artifacts": []},
            "script": {},
            "hyperparams": {},
            "configuration": {},
            "models": {"input": [], "output": []},
            "container": {},
            "runtime": {},
            "output": {},
            "last_metrics": {},
            "last_iteration": 0,
        }
        task.update({k: copy.deepcopy(v) for k, v in query.items() if k in self.TASK_FIELDS})
        task["execution"].setdefault("artifacts", [])
        if task.get("output_dest"):
            task["output"]["destination"] = task.pop("output_dest")
        self.tasks[task["id"]] = task
        return {"id": task["id"]}

    def tasks__edit(self, query):
        task = self._task(query["task"])
        fields = {k: copy.deepcopy(v) for k, v in query.items() if k in self.TASK_FIELDS}
        if "execution" in fields:
            fields["execution"].setdefault("artifacts", task["execution"].get("artifacts", []))
        if "output_dest" in fields:
            task["output"]["destination"] = fields.pop("output_dest")
        task.update(fields, last_update=now())
        return {"updated": 1, "fields": fields}

    def tasks__update(self, query):
        task = self._task(query["task"])
        task.update({k: v for k, v in query.items() if k in ("name", "comment", "tags", "system_tags", "project")})
        if "output__error" in query:
            task["output"]["error"] = query["output__error"]
        return {"updated": 1, "fields": {}}

    def tasks__get_by_id(self, query):
        return {"task": copy.deepcopy(self._task(query["task"]))}

    def tasks__get_all(self, query):
        fields = ("project", "status", "type", "parent", "user")
        return {"tasks": _select(list(self.tasks.values()), query, fields)}

    tasks__get_all_ex = tasks__get_all

    def tasks__get_types(self, _):
        return {"types": sorted({t["type"] for t in self.tasks.values()})}

    def tasks__clone(self, query):
        source = self._task(query["task"])
        clone = {k: copy.deepcopy(v) for k, v in source.items() if k in self.TASK_FIELDS}
        clone["execution"] = {**clone.get("execution", {}), "artifacts": [], "queue": None}
        clone["name"] = query.get("new_task_name") or source["name"]
        for key in ("project", "comment", "tags", "system_tags", "parent", "hyperparams", "configuration"):
            if query.get(f"new_task_{key}") is not None:
                clone[key] = query[f"new_task_{key}"]
        clone["parent"] = query.get("new_task_parent") or source["id"]
        if query.get("new_task_container") is not None:
            clone["container"] = query["new_task_container"]
        clone["models"] = {"input": clone.get("models", {}).get("input", []), "output": []}
        clone["output_dest"] = source["output"].get("destination")  # the server keeps the destination
        created = self.tasks__create(clone)
        return {"id": created["id"], "new_project": None}

    def tasks__ping(self, query):
        self._task(query["task"])["last_update"] = now()
        return {}

    def tasks__started(self, query):
        return self._set_status(self._task(query["task"]), "in_progress", query, started=now())

    def tasks__stopped(self, query):
        return self._set_status(self._task(query["task"]), "stopped", query)

    def tasks__stop(self, query):
        task = self._task(query["task"])
        if task["status"] == "queued":
            self._dequeue(task)
            return self._set_status(task, "stopped", query)
        task["status_message"] = "stopping"  # the running process sees it and stops itself
        return {"updated": 1, "fields": {"status_message": "stopping"}}

    def tasks__completed(self, query):
        return self._set_status(self._task(query["task"]), "completed", query, completed=now())

    def tasks__failed(self, query):
        return self._set_status(self._task(query["task"]), "failed", query, completed=now())

    def tasks__close(self, query):
        return self._set_status(self._task(query["task"]), "closed", query)

    def tasks__publish(self, query):
        return self._set_status(self._task(query["task"]), "published", query)

    def tasks__reset(self, query):
        task = self._task(query["task"])
        self._dequeue(task)
        task["execution"]["artifacts"] = []
        task["models"]["output"] = []
        task.update(last_metrics={}, last_iteration=0, output={"destination": task["output"].get("destination")})
        self.events.pop(task["id"], None)
        return {**self._set_status(task, "created", query), "dequeued": {}, "frames": {}, "events": {}}

    def tasks__delete(self, query):
        task = self._task(query["task"])
        self._dequeue(task)
        del self.tasks[task["id"]]
        self.events.pop(task["id"], None)
        return {"deleted": True, "updated_children": 0, "updated_models": 0, "events": {}, "urls": {}}

    def tasks__set_requirements(self, query):
        self._task(query["task"])["script"]["requirements"] = query.get("requirements")
        return {"updated": 1, "fields": {}}

    # parameters, configuration, artifacts, models

    def tasks__edit_hyper_params(self, query):
        task = self._task(query["task"])
        replace = query.get("replace_hyperparams", "none")
        if replace == "all":
            task["hyperparams"] = {}
        sections = {p.get("section", "General") for p in query["hyperparams"]}
        if replace == "section":
            for section in sections:
                task["hyperparams"][section] = {}
        for param in query["hyperparams"]:
            section = param.get("section", "General")
            task["hyperparams"].setdefault(section, {})[param["name"]] = {"section": section, **param}
        return {"updated": 1}

    def tasks__get_hyper_params(self, query):
        params = []
        for task_id in query["tasks"]:
            sections = self._task(task_id)["hyperparams"]
            params.append({"task": task_id, "hyperparams": [p for s in sections.values() for p in s.values()]})
        return {"params": params}

    def tasks__delete_hyper_params(self, query):
        task = self._task(query["task"])
        for param in query["hyperparams"]:
            section = task["hyperparams"].get(param["section"], {})
            if param.get("name"):
                section.pop(param["name"], None)
            else:
                task["hyperparams"].pop(param["section"], None)
        return {"deleted": 1}

    def tasks__edit_configuration(self, query):
        task = self._task(query["task"])
        if query.get("replace_configuration"):
            task["configuration"] = {}
        for item in query["configuration"]:
            task["configuration"][item["name"]] = item
        return {"updated": 1}

    def tasks__get_configurations(self, query):
        found = []
        for task_id in query["tasks"]:
            items = self._task(task_id)["configuration"]
            names = query.get("names") or list(items)
            found.append({"task": task_id, "configuration": [items[n] for n in names if n in items]})
        return {"configurations": found}

    def tasks__get_configuration_names(self, query):
        names = [{"task": t, "names": list(self._task(t)["configuration"])} for t in query["tasks"]]
        return {"configurations": names}

    def tasks__add_or_update_artifacts(self, query):
        artifacts = self._task(query["task"])["execution"].setdefault("artifacts", [])
        for artifact in query["artifacts"]:
            key = (artifact["key"], artifact.get("mode", "output"))
            artifacts[:] = [a for a in artifacts if (a["key"], a.get("mode", "output")) != key] + [artifact]
        return {"updated": len(query["artifacts"])}

    def tasks__delete_artifacts(self, query):
        artifacts = self._task(query["task"])["execution"].setdefault("artifacts", [])
        keys = {a["key"] for a in query["artifacts"]}
        artifacts[:] = [a for a in artifacts if a["key"] not in keys]
        return {"deleted": len(keys)}

    def tasks__add_or_update_model(self, query):
        models = self._task(query["task"])["models"].setdefault(query["type"], [])
        entry = {"name": query["name"], "model": query["model"]}
        models[:] = [m for m in models if m["name"] != entry["name"]] + [entry]
        return {"updated": 1}

    def tasks__delete_models(self, query):
        task = self._task(query["task"])
        for model in query["models"]:
            task["models"][model["type"]] = [m for m in task["models"][model["type"]] if m["name"] != model["name"]]
        return {"updated": 1}

    # --- queues -------------------------------------------------------------------------------

    def _queue(self, queue_id: str) -> dict:
        if queue_id not in self.queues:
            raise ApiError(400, f"invalid queue id {queue_id}", 701)
        return self.queues[queue_id]

    def _dequeue(self, task: dict) -> None:
        queue = self.queues.get(task["execution"].get("queue") or "")
        if queue:
            queue["entries"] = [e for e in queue["entries"] if e["task"] != task["id"]]

    def queues__create(self, query):
        queue = {"id": new_id(), "name": query["name"], "created": now(), "entries": [], "tags": [], "system_tags": []}
        queue["system_tags"] = query.get("system_tags") or []
        self.queues[queue["id"]] = queue
        return {"id": queue["id"]}

    def queues__get_all(self, query):
        return {"queues": _select(list(self.queues.values()), query, ())}

    queues__get_all_ex = queues__get_all

    def queues__get_by_id(self, query):
        return {"queue": copy.deepcopy(self._queue(query["queue"]))}

    def queues__get_default(self, _):
        raise ApiError(400, "no default queue: the stand-in server has none", 701)

    def tasks__enqueue(self, query):
        task = self._task(query["task"])
        queue_id = query.get("queue")
        if not queue_id and query.get("queue_name"):
            named = [q["id"] for q in self.queues.values() if q["name"] == query["queue_name"]]
            queue_id = named[0] if named else self.queues__create({"name": query["queue_name"]})["id"]
        queue = self._queue(queue_id)
        if task["status"] not in ("created", "stopped", "failed", "completed", "closed"):
            raise ApiError(400, f"task {task['id']} cannot be enqueued from status {task['status']}", 110)
        task["execution"]["queue"] = queue_id
        queue["entries"].append({"task": task["id"], "added": now()})
        return {"queued": 1, **self._set_status(task, "queued", query)}

    def tasks__dequeue(self, query):
        task = self._task(query["task"])
        self._dequeue(task)
        return {"dequeued": 1, **self._set_status(task, "created", query)}

    def queues__add_task(self, query):
        self._queue(query["queue"])["entries"].append({"task": query["task"], "added": now()})
        return {"added": 1}

    def queues__remove_task(self, query):
        queue = self._queue(query["queue"])
        queue["entries"] = [e for e in queue["entries"] if e["task"] != query["task"]]
        return {"removed": 1}

    def queues__get_next_task(self, query):
        queue = self._queue(query["queue"])
        if not queue["entries"]:
            return {}
        entry = queue["entries"].pop(0)
        return {"entry": entry, **({"task_info": {"company": USER["company"]["id"], "user": USER["id"]}})}

    # --- workers ------------------------------------------------------------------------------

    def workers__register(self, query):
        self.workers[query["worker"]] = {"id": query["worker"], "queues": query.get("queues", []), "task": None}
        return {}

    def workers__unregister(self, query):
        self.workers.pop(query["worker"], None)
        return {}

    def workers__status_report(self, query):
        worker = self.workers.setdefault(query["worker"], {"id": query["worker"], "queues": []})
        worker["task"] = query.get("task")
        return {}

    def workers__get_runtime_properties(self, query):
        return {"runtime_properties": self.workers.get(query["worker"], {}).get("runtime_properties", [])}

    def workers__set_runtime_properties(self, query):
        self.workers.setdefault(query["worker"], {"id": query["worker"]})["runtime_properties"] = query.get(
            "runtime_properties", []
        )
        return {}

    def workers__get_all(self, _):
        workers = copy.deepcopy(list(self.workers.values()))
        for worker in workers:  # the server answers with each queue's id and name
            worker["queues"] = [{"id": q, "name": self.queues[q]["name"]} for q in worker["queues"] if q in self.queues]
        return {"workers": workers}

    # --- models -------------------------------------------------------------------------------

    MODEL_FIELDS = (
        "name", "uri", "labels", "comment", "tags", "system_tags", "framework", "design", "ready",
        "project", "parent", "task", "metadata",
    )  # fmt: skip

    def _model(self, model_id: str) -> dict:
        if model_id not in self.models:
            raise ApiError(400, f"invalid model id {model_id}", 201)
        return self.models[model_id]

    def models__create(self, query):
        model = {"id": new_id(), "user": USER["id"], "company": USER["company"]["id"], "created": now()}
        model.update(tags=[], system_tags=[], ready=False, labels={}, metadata={}, last_update=now())
        model.update({k: copy.deepcopy(v) for k, v in query.items() if k in self.MODEL_FIELDS})
        self.models[model["id"]] = model
        return {"id": model["id"], "created": True}

    def models__edit(self, query):
        model = self._model(query["model"])
        model.update({k: copy.deepcopy(v) for k, v in query.items() if k in self.MODEL_FIELDS}, last_update=now())
        return {"updated": 1, "fields": {}}

    models__update = models__edit

    def models__update_for_task(self, query):
        task = self._task(query["task"])
        fields = {k: v for k, v in query.items() if k in self.MODEL_FIELDS}
        model_id = query.get("override_model_id")
        if model_id:
            self.models__edit({"model": model_id, **fields})
        else:
            model_id = self.models__create({"project": task.get("project"), **fields})["id"]
        self.tasks__add_or_update_model({"task": task["id"], "name": fields.get("name"), "model": model_id,
                                         "type": "output"})  # fmt: skip
        return {"id": model_id, "created": not query.get("override_model_id"), "updated": 1}

    def models__get_by_id(self, query):
        return {"model": copy.deepcopy(self._model(query["model"]))}

    def models__get_all(self, query):
        return {"models": _select(list(self.models.values()), query, ("project", "task", "framework", "ready"))}

    models__get_all_ex = models__get_all

    def models__set_ready(self, query):
        self._model(query["model"])["ready"] = True
        return {"updated": 1, "published_task": {}}

    def models__add_or_update_metadata(self, query):
        metadata = self._model(query["model"]).setdefault("metadata", {})
        for item in query["metadata"]:
            metadata[item["key"]] = item
        return {"updated": 1}

    # --- events -------------------------------------------------------------------------------

    def events__add_batch(self, events: list):
        for event in events:
            task = self._task(event["task"])
            self.events.setdefault(task["id"], []).append(event)
            if event.get("type") == "training_stats_scalar":
                # The server keys the last values by the md5 of metric and variant names.
                variants = task["last_metrics"].setdefault(_hashed(event["metric"]), {})
                last = variants.get(_hashed(event["variant"]))
                value = event["value"]
                variants[_hashed(event["variant"])] = {
                    "metric": event["metric"],
                    "variant": event["variant"],
                    "value": value,
                    "min_value": min(value, last["min_value"]) if last else value,
                    "max_value": max(value, last["max_value"]) if last else value,
                    "last_iteration": event.get("iter", 0),
                }
                task["last_iteration"] = max(task.get("last_iteration", 0), event.get("iter", 0))
        return {"added": len(events), "errors": 0, "errors_info": {}}

    def events__get_task_events(self, query):
        events = [e for e in self.events.get(query["task"], []) if query.get("event_type") in (None, e.get("type"))]
        return {"events": events, "returned": len(events), "total": len(events), "scroll_id": "end"}

    def events__scalar_metrics_iter_histogram(self, query):
        """Every scalar of a task as ``{metric: {variant: {"x": iterations, "y": values}}}``."""
        found: dict = {}
        for event in self.events.get(query["task"], []):
            if event.get("type") == "training_stats_scalar":
                series = found.setdefault(event["metric"], {}).setdefault(event["variant"], {"x": [], "y": []})
                series["name"] = event["variant"]
                series["x"].append(event.get("iter", 0))
                series["y"].append(event["value"])
        return found


class ClearMLStandIn:
    """Both servers, started on free ports of 127.0.0.1 for the ``with`` block."""

    def __init__(self, folder: Path):
        self.api = ApiServer()
        self.files = FileServer(folder / "files")
        self._servers = [_Server(self.api), _Server(self.files)]
        self.api_host, self.files_host = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)

    def client_environment(self, home: Path, **extra: str) -> dict[str, str]:
        """The environment of a process that uses this server, as a user's shell (or an agent's
        machine) holds it: the server's addresses and (any) keys, its own HOME, none of the test
        suite's offline settings, nothing ClearML sets for its own sub-processes."""
        from components.common.tracking import child_environment

        home.mkdir(parents=True, exist_ok=True)
        env = child_environment(
            **{
                "CLEARML_API_HOST": self.api_host,
                "CLEARML_WEB_HOST": self.api_host,
                "CLEARML_FILES_HOST": self.files_host,
                "CLEARML_API_ACCESS_KEY": "stand-in-access-key",
                "CLEARML_API_SECRET_KEY": "stand-in-secret-key",
                "HOME": str(home),
                "PYTHONUNBUFFERED": "1",
                **extra,
            }
        )
        for key in ("CLEARML_OFFLINE_MODE", "CLEARML_CONFIG_FILE", "CLEARML_CACHE_DIR", "HEADGEAR_DATA_STORE"):
            env.pop(key, None)
        return env

    def __enter__(self) -> ClearMLStandIn:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


# --- queries ------------------------------------------------------------------------------------


def _matches_tags(have: list, wanted: list) -> bool:
    """The server's tag filter: plain tags must all be present (``__$any`` switches to any),
    ``-tag`` or ``__$not tag`` must be absent."""
    required, excluded, mode, negate = [], [], "all", False
    for tag in wanted:
        if tag in ("__$all", "__$and"):
            mode = "all"
        elif tag in ("__$any", "__$or"):
            mode = "any"
        elif tag == "__$not":
            negate = True
        elif negate or tag.startswith("-"):
            excluded.append(tag if negate else tag[1:])
            negate = False
        else:
            required.append(tag)
    if any(tag in have for tag in excluded):
        return False
    if not required:
        return True
    return all(t in have for t in required) if mode == "all" else any(t in have for t in required)


def _matches(document: dict, query: dict, fields: tuple[str, ...]) -> bool:
    """``get_all``'s filters that the SDK and the agent use: ids, a name pattern, tags, a
    pattern searched in some fields (``_all_``/``_any_``), and equality (or membership in a
    list) on ``fields``."""
    if query.get("id") and document["id"] not in _as_list(query["id"]):
        return False
    if query.get("name") and not re.search(query["name"], document.get("name", "")):
        return False
    for key in ("tags", "system_tags"):
        if query.get(key) and not _matches_tags(document.get(key, []), query[key]):
            return False
    for field in fields:
        if query.get(field) not in (None, [], "") and document.get(field) not in _as_list(query[field]):
            return False
    for key, combine in (("_all_", all), ("_any_", any)):
        search = query.get(key)
        if search and not combine(re.search(search["pattern"], str(_get(document, f) or "")) for f in search["fields"]):
            return False
    return True


def _select(documents: list[dict], query: dict, fields: tuple[str, ...]) -> list[dict]:
    """The documents ``query`` selects (see ``_matches``), in its ``order_by``, its page."""
    found = [document for document in documents if _matches(document, query, fields)]
    for order in reversed(query.get("order_by") or []):
        field = order.lstrip("-+")
        found.sort(key=lambda d, field=field: str(_get(d, field) or ""), reverse=order.startswith("-"))
    page, size = query.get("page"), query.get("page_size")
    if page is not None and size:
        found = found[int(page) * int(size) : (int(page) + 1) * int(size)]
    return [copy.deepcopy(d) for d in found]


def _hashed(name: str) -> str:
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def last_metrics(task: dict) -> dict:
    """A task's last scalar values by metric and variant names, read back from the hashed keys."""
    named: dict = {}
    for variants in task["last_metrics"].values():
        for value in variants.values():
            named.setdefault(value["metric"], {})[value["variant"]] = value
    return named


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _get(document: dict, path: str):
    for part in path.split("."):
        document = document.get(part) if isinstance(document, dict) else None
    return document
