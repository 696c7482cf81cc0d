"""The ``dicom-node`` command line.

The commands run on the node's host as an OS user and need no web role: whoever can read
the settings file and reach the database may manage users and tokens there (README
"Security"). User and token changes made here go into the audit trail as
``cli:<OS user>`` from ``cli:<OS user>@<host>``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from dicom_node import retrieve_cli
from dicom_node.rules import RulesError
from dicom_node.web.users import ROLES
from inference.registry import RegistryError
from kernel.settings import ConfigError, load_settings

ROLE_HELP = (
    "viewer: sees everything but patient IDs, acts on nothing; reviewer: also approves or "
    "rejects results held for review; operator: also retries, cancels, resends, C-ECHOes "
    "and uses the path API, sees patient IDs; admin: all of that, and users, tokens, "
    "settings and the audit trail"
)
# The synthetic study's field of view: the same ~400 mm at every matrix size (0.78 mm
# pixels at 512), so the phantom's body and its kidneys stay in the image whatever --rows
# is; --rows changes the pixel size.
SYNTH_FIELD_OF_VIEW_MM = 0.78 * 512


def _devkit(module: str) -> ModuleType:
    """A module of the development kit, loaded only by the commands that need it."""
    try:
        return importlib.import_module(f"devkit.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("devkit"):
            raise SystemExit(
                "dicom-node: this command needs the development kit (the devkit package), "
                "which this installation does not include"
            ) from None
        raise


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.service import Node

    settings = load_settings(args.config)
    _setup_logging(settings.log_level)
    Node(settings).serve_forever()
    return 0


def _synth(args: argparse.Namespace) -> int:
    import pydicom.uid

    synth = _devkit("synth")
    if args.rows < 16:
        print("dicom-node: --rows must be at least 16", file=sys.stderr)
        return 2
    ts = getattr(pydicom.uid, args.transfer_syntax)
    study = synth.generate_study(
        Path(args.out),
        seed=args.seed,
        phases=args.phases,
        rows=args.rows,
        columns=args.rows,
        pixel_spacing_mm=round(SYNTH_FIELD_OF_VIEW_MM / args.rows, 4),
        slices=args.slices,
        transfer_syntax=ts,
    )
    for series in study.series:
        if args.truth:
            synth.write_truth_nifti(series, Path(args.out) / f"truth_{series.phase}.nii.gz")
        print(f"{series.phase} {series.series_uid} {len(series.files)} files  {series.description}")
    print(f"study {study.study_uid} written to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    demo = _devkit("demo")
    _setup_logging("WARNING" if not args.verbose else "INFO")
    return demo.run_demo(keep=args.keep, rows=args.rows)


def _spacing_lookup(models_file: Path, rules_file: Path) -> Callable[[str], float | None] | None:
    """pipeline -> its first model's slice spacing, from the registry (None if unreadable)."""
    from inference.model_spacing import target_spacing_mm
    from inference.registry import load_registry
    from kernel.catalog import CatalogError, load_catalog

    try:
        registry = load_registry(models_file, check_folders=False)
        pipelines = load_catalog(rules_file)
    except (RegistryError, CatalogError):
        return None

    def lookup(name: str) -> float | None:
        spec = pipelines.get(name)
        model = registry.models.get(spec.models[0]) if spec else None
        return target_spacing_mm(model) if model else None

    return lookup


def _route_explain(args: argparse.Namespace) -> int:
    import json

    from dicom_node.explain import explain, format_text
    from dicom_node.rules import load_rules

    settings = load_settings(args.config)
    rules_file = args.rules or settings.rules_file
    rules = load_rules(Path(rules_file))
    spacing = _spacing_lookup(settings.models_file, Path(rules_file))
    evidence = rules.spec.phases.image_evidence
    image = None
    if not args.no_image_evidence and evidence.when != "never" and evidence.model:
        from dicom_node.image_evidence import in_process

        print(
            f"image evidence: measured in this process with model {evidence.model} where the "
            "tags are weak, as a worker would (needs the models; --no-image-evidence: tags "
            "only)",
            file=sys.stderr,
        )
        image = in_process(settings.models_file, evidence)
    items = explain(rules, args.paths, spacing, image)
    print(json.dumps(items, indent=2, ensure_ascii=False) if args.json else format_text(items))
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from db.migrate import upgrade

    settings = load_settings(args.config)
    upgrade(settings.db_url)
    print(f"database at head: {settings.db_url}")
    return 0


class CliError(Exception):
    """A command that cannot be carried out; the message tells the operator what to do."""


def _settings_source(args: argparse.Namespace) -> str | None:
    """Where the node's settings come from: the file, the environment, or None."""
    import os

    if args.config or os.environ.get("DICOM_NODE_CONFIG"):
        return f"settings file {args.config or os.environ['DICOM_NODE_CONFIG']}"
    for key in ("DICOM_NODE_DATABASE_URL", "DICOM_NODE_DATA_DIR"):
        if os.environ.get(key):
            return f"environment variable {key}"
    return None


def _user_db(args: argparse.Namespace):
    """The node's database for user and token commands.

    Refuses (``CliError``) when neither a settings file (``-c``, ``DICOM_NODE_CONFIG``)
    nor ``DICOM_NODE_DATA_DIR`` / ``DICOM_NODE_DATABASE_URL`` says which node is meant:
    the defaults would quietly create a new database in the current folder, where the
    running node never looks.
    """
    from db.migrate import upgrade
    from db.session import Database

    settings = load_settings(args.config)
    if _settings_source(args) is None:
        raise CliError(
            "which node? No settings file (-c node.yaml or DICOM_NODE_CONFIG) and no "
            "DICOM_NODE_DATA_DIR / DICOM_NODE_DATABASE_URL: this would use "
            f"{settings.db_url}, a new database in the current folder that the running "
            "node does not read. Give the node's settings file with -c."
        )
    upgrade(settings.db_url)
    return Database(settings.db_url)


def _read_password(args: argparse.Namespace) -> str:
    """The (new) password: one line of stdin (``--password-stdin``) or typed twice at the
    terminal. Raises ``CliError`` without a terminal, or when the two differ."""
    import getpass

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CliError(
            "no terminal to ask for the password: pipe it in with --password-stdin "
            '(echo "$PW" | dicom-node -c node.yaml user add NAME --password-stdin)'
        )
    try:
        password = getpass.getpass(f"password for {args.name}: ")
        again = getpass.getpass("again: ")
    except (EOFError, KeyboardInterrupt):
        raise CliError("no password given; nothing created") from None
    if again != password:
        raise CliError("passwords differ; nothing created")
    return password


def _min_password(args: argparse.Namespace) -> int:
    return load_settings(args.config).web.password_min_length


def _audited(db, action: str, object_type: str, object_id: str | int, problem=None, **detail):
    """One audit record of a CLI change (``cli:<OS user>`` from this host)."""
    from dicom_node import audit

    audit.record(
        db,
        action,
        audit.cli_actor(),
        outcome=audit.Outcome.FAILURE if problem else audit.Outcome.SUCCESS,
        object_type=object_type,
        object_id=object_id,
        detail={**detail, "problem": problem} if problem else detail or None,
    )


def _user_add(args: argparse.Namespace) -> int:
    from dicom_node.web.users import UserError, add_user

    db = _user_db(args)  # first: a wrong database is refused before a password is asked
    try:
        password = _read_password(args)
        add_user(db, args.name, password, args.role, _min_password(args))
    except UserError as exc:
        _audited(db, "user_created", "user", args.name, str(exc), role=args.role)
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    else:
        _audited(db, "user_created", "user", args.name, role=args.role)
    finally:
        db.dispose()
    print(f"user {args.name} ({args.role}) created in {_safe_url(db.url)}")
    return 0


def _user_change(args: argparse.Namespace) -> int:
    """disable | enable | delete | unlock | reset-password | role: one change to a user,
    recorded in the audit trail (refused ones too)."""
    from dicom_node.web import users

    action = args.user_command
    db = _user_db(args)
    audit_action = {
        "disable": "user_disabled",
        "enable": "user_enabled",
        "delete": "user_deleted",
        "unlock": "user_unlocked",
        "reset-password": "password_reset",
        "role": "user_role_changed",
    }[action]
    detail: dict[str, object] = {}
    try:
        if action == "disable":
            changed = users.set_disabled(db, args.name, True)
            message = "disabled; its sessions ended" if changed else "was already disabled"
        elif action == "enable":
            changed = users.set_disabled(db, args.name, False)
            message = "enabled" if changed else "was already enabled"
        elif action == "delete":
            tokens = users.delete_user(db, args.name)
            message = f"deleted with {tokens} token(s)"
            detail["tokens_revoked"] = tokens
        elif action == "unlock":
            message = "unlocked" if users.unlock(db, args.name) else "was not locked"
        elif action == "reset-password":
            password = _read_password(args)
            ended = users.reset_password(db, args.name, password, _min_password(args))
            message = f"has a new password; {ended} session(s) ended"
            detail["sessions_ended"] = ended
        else:
            old = users.set_role(db, args.name, args.role)
            message = f"is now {args.role} (was {old})"
            detail.update(role=args.role, was=old)
    except users.UserError as exc:
        if not isinstance(exc, users.NotFoundError):
            _audited(db, audit_action, "user", args.name, str(exc))
        db.dispose()
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    _audited(db, audit_action, "user", args.name, **detail)
    db.dispose()
    print(f"user {args.name} {message}")
    return 0


def _safe_url(url: str) -> str:
    """A database URL without its password (for messages)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _when(value) -> str:
    return value.isoformat(timespec="seconds") if value else "never"


def _user_list(args: argparse.Namespace) -> int:
    """One line per user: name, role, state, last login, password set, sessions, tokens
    (tab-separated)."""
    from dicom_node.web.users import list_users

    db = _user_db(args)
    for u in list_users(db):
        print(
            f"{u.username}\t{u.role}\t{u.state}\tlast login {_when(u.last_login_at)}\t"
            f"password set {_when(u.password_changed_at)}\t{u.sessions} session(s)\t"
            f"{u.tokens} token(s)"
        )
    db.dispose()
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from db.models import utcnow
    from dicom_node import audit
    from dicom_node.web.users import UserError, create_token, list_tokens

    db = _user_db(args)
    expires = utcnow() + timedelta(days=args.expires_days) if args.expires_days else None
    try:
        if args.expires_days is not None and not 1 <= args.expires_days <= 3650:
            raise UserError("--expires-days must be 1-3650")
        token = create_token(db, args.user, args.name, audit.cli_actor().name, expires)
    except UserError as exc:
        _audited(db, "token_created", "token", args.name, str(exc), user=args.user)
        db.dispose()
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    created = list_tokens(db, args.user)[-1]
    _audited(
        db,
        "token_created",
        "token",
        created.id,
        user=args.user,
        name=args.name,
        expires_at=expires.isoformat() if expires else None,
    )
    db.dispose()
    print(token)  # shown once; only its hash is stored
    return 0


def _token_list(args: argparse.Namespace) -> int:
    """One line per token: id, name, user (role), made by, created, last used, expiry."""
    from dicom_node.web.users import list_tokens

    db = _user_db(args)
    for t in list_tokens(db, args.user):
        expiry = (
            (_when(t.expires_at) + (" (expired)" if t.expired else ""))
            if t.expires_at
            else ("no expiry")
        )
        print(
            f"{t.id}\t{t.name}\t{t.username} ({t.role})\tmade by {t.created_by or '?'}\t"
            f"created {_when(t.created_at)}\tlast used {_when(t.last_used_at)}\t"
            f"expires {expiry}"
        )
    db.dispose()
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from dicom_node.web.users import UserError, revoke_token

    db = _user_db(args)
    try:
        info = revoke_token(db, args.id)
    except UserError as exc:
        db.dispose()
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    _audited(db, "token_revoked", "token", args.id, user=info.username, name=info.name)
    db.dispose()
    print(f"token {args.id} ({info.name!r} of {info.username}) revoked")
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    """The audit trail (filtered) as JSON lines, oldest first, to stdout or ``--output``."""
    from datetime import UTC, datetime

    from dicom_node import audit

    def moment(text: str | None) -> datetime | None:
        if not text:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise CliError(f"{text!r} is not an ISO 8601 time (e.g. 2025-03-01T00:00)") from None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    query = audit.Query(
        actor=args.actor,
        action=args.action,
        study_uid=args.study_uid,
        patient_id=args.patient_id,
        since=moment(args.since),
        until=moment(args.until),
    )
    db = _user_db(args)
    count = 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for line in audit.export_lines(db, query):
            out.write(line)
            count += 1
    finally:
        if args.output:
            out.close()
    _audited(db, "audit_exported", "audit", args.output or "stdout", records=count)
    db.dispose()
    if args.output:
        print(f"{count} audit records written to {args.output}", file=sys.stderr)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from inference.celery_app import make_app

    settings = load_settings(args.config)
    _setup_logging(settings.log_level)
    if not settings.worker.broker_url:
        print("dicom-node: worker.broker_url must be set for `dicom-node worker`", file=sys.stderr)
        return 2
    device = args.device or settings.worker.device
    if device == "auto":
        from inference.gpu import worker_devices

        device = worker_devices("auto", [])[0]
    app = make_app(settings, device=device)
    # solo pool, concurrency 1: one job at a time per device, run by this process's warm
    # spawn child (a prefork pool process may not start children of its own).
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--queues={settings.worker.celery_queue}",
            f"--hostname=dicom-node-{device.replace(':', '')}@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument(
        "-c", "--config", help="settings YAML (default: $DICOM_NODE_CONFIG, else none)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node: receive, route, segment, send, web")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="end-to-end demo against a real Orthanc PACS")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--rows", type=int, default=512, help="image size of the synthetic study")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("synth", help="write a synthetic multi-phase CT study")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default="NAPD", help="letters of N, A, P, D")
    p.add_argument(
        "--rows",
        type=int,
        default=512,
        help="rows and columns of every image (default 512). The field of view stays "
        f"{SYNTH_FIELD_OF_VIEW_MM:.0f} mm, so N changes the pixel size "
        f"({SYNTH_FIELD_OF_VIEW_MM:.0f}/N mm) and the file size, not the anatomy: the whole "
        "body stays in the image at every N",
    )
    p.add_argument("--slices", type=int, default=None)
    p.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        help="pydicom.uid name, e.g. RLELossless, JPEGLSLossless, JPEG2000Lossless",
    )
    p.add_argument("--truth", action="store_true", help="also write truth masks as NIfTI")
    p.set_defaults(func=_synth)

    p = sub.add_parser("route", help="routing tools")
    routesub = p.add_subparsers(dest="route_command", required=True)
    ex = routesub.add_parser("explain", help="phase, rule, pipelines and forwards per series")
    ex.add_argument("paths", nargs="+", help="DICOM files or folders (several studies)")
    ex.add_argument("--json", action="store_true", help="one JSON array")
    ex.add_argument("--rules", help="rules file (default: the settings' rules_file)")
    ex.add_argument(
        "--no-image-evidence",
        action="store_true",
        help="classify from the tags only (image evidence needs the models and torch)",
    )
    ex.set_defaults(func=_route_explain)

    p = sub.add_parser("db", help="database maintenance")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations up to the newest schema")
    up.set_defaults(func=_db_upgrade)

    p = sub.add_parser("worker", help="a Celery GPU worker for one device (scale-out)")
    p.add_argument("--device", help="cpu or cuda:N (default: worker.device; auto = first GPU)")
    p.set_defaults(func=_worker)

    p = sub.add_parser("user", help="web users (the first admin is created here)")
    usub = p.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="create a user; the password is prompted for")
    add.add_argument("name")
    add.add_argument("--role", choices=list(ROLES), default="viewer", help=ROLE_HELP)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.set_defaults(func=_user_add)
    ls = usub.add_parser("list", help="list users: role, state, last login, sessions, tokens")
    ls.set_defaults(func=_user_list)
    for name, text in (
        ("disable", "no login, tokens refused, sessions ended at once"),
        ("enable", "allow a disabled user again"),
        ("delete", "delete a user with their tokens and sessions"),
        ("unlock", "lift a lockout after wrong passwords"),
        ("reset-password", "set a new password (prompted); ends the user's sessions"),
        ("role", "change a user's role"),
    ):
        cmd = usub.add_parser(name, help=text)
        cmd.add_argument("name")
        if name == "reset-password":
            cmd.add_argument(
                "--password-stdin", action="store_true", help="read the password from stdin"
            )
        if name == "role":
            cmd.add_argument("role", choices=list(ROLES), help=ROLE_HELP)
        cmd.set_defaults(func=_user_change)

    p = sub.add_parser("token", help="API tokens for the JSON API")
    tsub = p.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="create a token and print it once")
    create.add_argument("name", help="what the token is for, e.g. prometheus")
    create.add_argument("--user", required=True, help="the user the token acts as")
    create.add_argument(
        "--expires-days", type=int, default=None, help="refused after this many days"
    )
    create.set_defaults(func=_token_create)
    tls_ = tsub.add_parser("list", help="tokens: id, name, user, creator, last use, expiry")
    tls_.add_argument("--user", help="only this user's tokens")
    tls_.set_defaults(func=_token_list)
    revoke = tsub.add_parser("revoke", help="delete a token (refused from now on)")
    revoke.add_argument("id", type=int, help="the token's id (token list)")
    revoke.set_defaults(func=_token_revoke)

    p = sub.add_parser("audit", help="the audit trail")
    asub = p.add_subparsers(dest="audit_command", required=True)
    export = asub.add_parser("export", help="write audit records as JSON lines, oldest first")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.add_argument("--since", help="ISO 8601 time, inclusive (no zone: UTC)")
    export.add_argument("--until", help="ISO 8601 time, exclusive (no zone: UTC)")
    export.add_argument("--actor", help="only this user, AE title or cli:<OS user>")
    export.add_argument("--action", help="only this action, e.g. study_viewed")
    export.add_argument("--study-uid", help="only records about this study")
    export.add_argument("--patient-id", help="only records about this patient")
    export.set_defaults(func=_audit_export)

    retrieve_cli.add_parser(sub, _user_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RulesError, RegistryError, CliError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dicom-node: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
