"""A small Hugging Face Hub for tests: stdlib only, 127.0.0.1 only, everything in memory.

It speaks the part of the Hub protocol that the unmodified ``huggingface_hub`` 2.x client
(and transformers / PEFT on top of it) uses to push and pull repositories, without Xet:

=====================================================  ==============================
endpoint                                               used by
=====================================================  ==============================
``GET  /api/whoami-v2``                                whoami, repo ids without namespace
``POST /api/repos/create``                             create_repo (409 + url when it exists)
``POST /api/{type}s/{repo}/preupload/{rev}``           upload mode per file (lfs / regular)
``POST /{repo}.git/info/lfs/objects/batch``            git-lfs batch API (basic transfer)
``PUT  /lfs-upload/{oid}``                             the LFS object itself
``POST /api/{type}s/{repo}/commit/{rev}``              ndjson commit (create_pr supported)
``POST /api/{type}s/{repo}/branch/{branch}``           create_branch
``POST /api/validate-yaml``                            README.md metadata check
``HEAD|GET /{repo}/resolve/{rev}/{path}``              downloads (X-Repo-Commit, ETag ...)
``GET  /api/{type}s/{repo}[/revision/{rev}]``          repo info (siblings, sha, private)
``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``       list_repo_tree (one page)
``POST /api/{type}s/{repo}/paths-info/{rev}``          get_paths_info
``GET  /api/{type}s/{repo}/refs``                      list_repo_refs
=====================================================  ==============================

Private repositories are visible only to requests carrying the server's token; a missing
repo, revision or file answers 404 with the ``X-Error-Code`` the client maps to
RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError. Every request is
recorded in :attr:`HubServer.calls` as ``"METHOD route"`` so a test can assert exactly
which endpoints a push used (protocol drift fails loudly).

Usage: ``hub = HubServer(); hub.start(); os.environ.update(hub.environment(hf_home))`` —
before ``huggingface_hub`` is first imported (it reads its environment once).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "tester"
TOKEN = "hf_local_test_token"
REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
#: files stored through git-lfs (the Hub's default .gitattributes covers these and large files)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npz", ".zip")
LFS_MIN_SIZE = 10 * 2**20


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def git_oid(self) -> str:
        return git_blob_sha(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, Entry]
    title: str
    parent: str | None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    n_prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        rev = urllib.parse.unquote(rev)
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.commits:
            return self.commits[rev]
        matches = [c for oid, c in self.commits.items() if len(rev) >= 7 and oid.startswith(rev)]
        return matches[0] if len(matches) == 1 else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubServer:
    """The server: ``start()`` binds a free port on 127.0.0.1 and serves in a daemon thread."""

    def __init__(self, token: str = TOKEN, user: str = USER):
        self.token, self.user = token, user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.lock = threading.RLock()
        self.httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="local-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def environment(self, hf_home: str) -> dict[str, str]:
        """Variables that point huggingface_hub (and transformers) at this server."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": self.token, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "0",
                "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"}

    def clear_calls(self) -> None:
        with self.lock:
            self.calls.clear()

    # -- repository model ----------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            # the Hub hides private repos behind the same answer as missing ones
            raise HubError(404 if authorized else 401, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def commit(self, repo: Repo, branch: str, title: str, parent: str | None, ops: list[tuple[str, str, object]],
               create_pr: bool) -> tuple[str, str | None]:
        base = repo.resolve(branch) if (branch in repo.branches or not create_pr) else None
        if base is None and branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        if parent and base is not None and parent != base.oid:
            raise HubError(412, None, f"parentCommit {parent} is not the head of {branch}")
        files = dict(base.files) if base else {}
        for kind, path, payload in ops:
            if kind == "add":
                files[path] = payload
            elif kind == "delete_file":
                if path not in files:
                    raise HubError(404, "EntryNotFound", f"{path} does not exist in {branch}")
                del files[path]
            elif kind == "delete_folder":
                prefix = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
        digest = hashlib.sha1(json.dumps({"p": base.oid if base else None, "t": title, "n": time.time_ns(),
                                          "f": sorted((p, e.git_oid) for p, e in files.items())}).encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, files, title, base.oid if base else None)
        pr_url = None
        if create_pr:
            repo.n_prs += 1
            repo.branches[f"refs/pr/{repo.n_prs}"] = oid
            pr_url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/discussions/{repo.n_prs}"
        else:
            repo.branches[branch] = oid
        return oid, pr_url

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        files = {".gitattributes": Entry(b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode()
                                                   for s in LFS_SUFFIXES), lfs=False)}
        oid = hashlib.sha1(f"init {repo_type} {repo_id}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, files, "initial commit", None)
        repo.branches["main"] = oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def download(self, repo_type: str, repo_id: str, rev: str, path: str, authorized: bool) -> bytes:
        """Test helper: a file's bytes as the server stores them."""
        repo = self.get_repo(repo_type, repo_id, authorized)
        commit = repo.resolve(rev)
        return commit.files[path].data


# routes: (method, name, regex); repo ids are "name" or "namespace/name"
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_TYPED = r"/api/(?P<type>models|datasets|spaces)/" + _REPO
ROUTES = [
    ("GET", "whoami", re.compile(r"/api/whoami-v2")),
    ("POST", "repos/create", re.compile(r"/api/repos/create")),
    ("POST", "validate-yaml", re.compile(r"/api/validate-yaml")),
    ("POST", "preupload", re.compile(_TYPED + r"/preupload/(?P<rev>.+)")),
    ("POST", "commit", re.compile(_TYPED + r"/commit/(?P<rev>.+)")),
    ("POST", "branch", re.compile(_TYPED + r"/branch/(?P<rev>.+)")),
    ("POST", "paths-info", re.compile(_TYPED + r"/paths-info/(?P<rev>.+)")),
    ("GET", "tree", re.compile(_TYPED + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")),
    ("GET", "refs", re.compile(_TYPED + r"/refs")),
    ("GET", "revision", re.compile(_TYPED + r"/revision/(?P<rev>.+)")),
    ("GET", "info", re.compile(_TYPED)),
    ("POST", "lfs-batch", re.compile(r"/(?P<prefix>datasets/|spaces/)?" + _REPO + r"\.git/info/lfs/objects/batch")),
    ("PUT", "lfs-upload", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})")),
    ("GET", "resolve", re.compile(r"/(?P<prefix>datasets/|spaces/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
    ("HEAD", "resolve", re.compile(r"/(?P<prefix>datasets/|spaces/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    @property
    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = urllib.parse.unquote(parsed.path), urllib.parse.parse_qs(parsed.query)
        body = self._body() if method in ("POST", "PUT") else b""
        for m, name, rx in ROUTES:
            match = rx.fullmatch(path) if m == method else None
            if match:
                with self.hub.lock:
                    self.hub.calls.append(f"{method} {name}")
                try:
                    with self.hub.lock:
                        getattr(self, "r_" + name.replace("-", "_").replace("/", "_"))(
                            match.groupdict(), query, body, method == "HEAD")
                except HubError as e:
                    headers = {"X-Error-Code": e.code} if e.code else {}
                    headers["X-Error-Message"] = e.message
                    self._send(e.status, {"error": e.message}, headers, head=method == "HEAD")
                return
        with self.hub.lock:
            self.hub.calls.append(f"{method} UNKNOWN {path}")
        self._send(404, {"error": f"local hub: no route for {method} {path}"}, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _repo(self, g: dict) -> Repo:
        repo_type = (g.get("type") or "models")[:-1] if g.get("type") else \
            {"": "model", None: "model", "datasets/": "dataset", "spaces/": "space"}[g.get("prefix")]
        return self.hub.get_repo(repo_type, g["repo"], self.authorized)

    def _require_write(self) -> None:
        if not self.authorized:
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _url(self, repo: Repo) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- routes --------------------------------------------------------------------------------
    def r_whoami(self, g, q, body, head):
        self._require_write()
        self._send(200, {"type": "user", "name": self.hub.user, "fullname": "Local Tester", "orgs": [],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "local", "role": "write"}}})

    def r_repos_create(self, g, q, body, head):
        self._require_write()
        req = json.loads(body or b"{}")
        repo_type = req.get("type") or "model"
        if repo_type not in REPO_TYPES or not req.get("name"):
            raise HubError(400, None, f"bad create request {req}")
        repo_id = f"{req.get('organization') or self.hub.user}/{req['name']}"
        private = bool(req.get("private")) or req.get("visibility") == "private"
        existing = self.hub.repos.get((repo_type, repo_id))
        if existing is not None:
            self._send(409, {"error": "You already created this repo", "url": self._url(existing)})
            return
        repo = self.hub.create_repo(repo_type, repo_id, private)
        self._send(200, {"url": self._url(repo), "name": repo_id, "id": repo_id})

    def r_validate_yaml(self, g, q, body, head):
        req = json.loads(body or b"{}")
        content = req.get("content", "")
        if content.startswith("---") and content.count("\n---") < 1:
            self._send(400, {"error": "README.md metadata block is not closed"})
            return
        self._send(200, {"errors": [], "warnings": []})

    def r_preupload(self, g, q, body, head):
        self._require_write()
        repo = self._repo(g)
        commit = repo.resolve(g["rev"])
        out = []
        for f in json.loads(body).get("files", []):
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f.get("size", 0)) >= LFS_MIN_SIZE
            entry = commit.files.get(f["path"]) if commit else None
            item = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if entry is not None:
                item["oid"] = entry.git_oid
            out.append(item)
        self._send(200, {"files": out, "commitOid": commit.oid if commit else None})

    def r_lfs_batch(self, g, q, body, head):
        self._require_write()
        self._repo(g)
        req = json.loads(body)
        if req.get("operation") != "upload":
            raise HubError(400, None, "only the upload operation is served")
        objects = []
        for o in req.get("objects", []):
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs_objects:
                obj["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}", "header": {}}}
            objects.append(obj)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def r_lfs_upload(self, g, q, body, head):
        if hashlib.sha256(body).hexdigest() != g["oid"]:
            raise HubError(400, None, f"LFS object does not hash to {g['oid']}")
        self.hub.lfs_objects[g["oid"]] = body
        self._send(200, {})

    def r_commit(self, g, q, body, head):
        self._require_write()
        repo = self._repo(g)
        header, ops = {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                ops.append(("add", value["path"], Entry(data, lfs=False)))
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(422, None, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                ops.append(("add", value["path"], Entry(data, lfs=True)))
            elif key == "deletedFile":
                ops.append(("delete_file", value["path"], None))
            elif key == "deletedFolder":
                ops.append(("delete_folder", value["path"], None))
            else:
                raise HubError(400, None, f"commit operation {key!r} is not served by the local hub")
        create_pr = q.get("create_pr", ["0"])[0] in ("1", "true", "True")
        oid, pr_url = self.hub.commit(repo, urllib.parse.unquote(g["rev"]), header.get("summary", ""),
                                      header.get("parentCommit"), ops, create_pr)
        self._send(200, {"commitUrl": f"{self._url(repo)}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": pr_url, "success": True})

    def r_branch(self, g, q, body, head):
        self._require_write()
        repo = self._repo(g)
        branch = urllib.parse.unquote(g["rev"])
        if branch in repo.branches:
            raise HubError(409, None, f"Reference {branch} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        commit = repo.resolve(start)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {start}")
        repo.branches[branch] = commit.oid
        self._send(200, {})

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "library_name": None,
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(commit.files)]}

    def r_info(self, g, q, body, head):
        repo = self._repo(g)
        self._send(200, self._info(repo, repo.resolve("main")))

    def r_revision(self, g, q, body, head):
        repo = self._repo(g)
        commit = repo.resolve(g["rev"])
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {g['rev']}")
        self._send(200, self._info(repo, commit))

    def _tree_item(self, path: str, entry: Entry) -> dict:
        item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
        return item

    def r_tree(self, g, q, body, head):
        repo = self._repo(g)
        commit = repo.resolve(g["rev"])
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {g['rev']}")
        base = (g.get("path") or "").strip("/")
        recursive = q.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, "EntryNotFound", f"{base} does not exist at {g['rev']}")
        items, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    items.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                  "path": d})
            if recursive or len(parts) == 1:
                items.append(self._tree_item(p, commit.files[p]))
        self._send(200, items)

    def r_paths_info(self, g, q, body, head):
        repo = self._repo(g)
        commit = repo.resolve(g["rev"])
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {g['rev']}")
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = urllib.parse.parse_qs(body.decode()).get("paths", [])
        out = [self._tree_item(p, commit.files[p]) for p in paths if p in commit.files]
        self._send(200, out)

    def r_refs(self, g, q, body, head):
        repo = self._repo(g)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                    for b, oid in repo.branches.items() if not b.startswith("refs/")]
        prs = [{"name": b, "ref": b, "targetCommit": oid} for b, oid in repo.branches.items()
               if b.startswith("refs/pr/")]
        self._send(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": prs})

    def r_resolve(self, g, q, body, head):
        repo = self._repo(g)
        commit = repo.resolve(g["rev"])
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {g['rev']}")
        entry = commit.files.get(g["path"])
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{g['path']} does not exist at {g['rev']}")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        data = entry.data
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng and not head:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else entry.size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream", head=head)
