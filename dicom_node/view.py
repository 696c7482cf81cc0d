"""What the web app may see of and do to the running node: a small typed view.

The web app gets this view instead of the whole ``Node``: the settings, the database, the
rules in force, the model registry (specs only: it never builds an engine or imports
torch), the health of the loops, where the DICOM listener listens, the worker devices, and
the few actions a page may trigger (wake the outbox, C-ECHO a destination), and the
receive path STOW-RS requests store through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from db.session import Database
from dicom_node.echo import EchoAnswer
from dicom_node.ingest import Intake
from dicom_node.rules_holder import RulesHolder
from inference.registry import ModelRegistry
from kernel.settings import NodeSettings


@dataclass(frozen=True)
class ServiceView:
    """A read-mostly view of a running node for the web app.

    Attributes
    ----------
    settings, db, rules, registry
        The node's settings, database, rules holder and model registry.
    loops
        Name -> alive, for each loop thread of the node (assembler, dispatcher, workers).
    listening
        Whether the DICOM listener accepts associations.
    listener_address
        (host, port) the DICOM listener is bound to, None when it is not listening.
    devices
        The devices local workers run on ("cpu", "cuda:0", ...); empty when jobs run on
        Celery workers elsewhere or the worker is disabled.
    associations_requested
        How many associations were requested since the listener started.
    wake_dispatcher
        Ask the outbox loop to look for due rows now (after a resend or an approval).
    echo_destination
        C-ECHO the named destination now on behalf of a user (name, username); the answer
        is kept with the periodic ones (``dicom_node.health``). None: not available.
    target_spacing_mm
        Pipeline name -> the slice spacing its first model works at, as the live router
        prefers among candidate inputs (the rules page's dry run plans the same way).
    wake_retriever
        Ask the retrieval loop to look for new retrieve requests now. None: not available.
    intake
        The receive path STOW-RS requests store through (the node's spool, recorder and
        completeness tracker). None: STOW-RS answers 503.
    """

    settings: NodeSettings
    db: Database
    rules: RulesHolder
    registry: ModelRegistry
    loops: Callable[[], dict[str, bool]]
    listening: Callable[[], bool]
    listener_address: Callable[[], tuple[str, int] | None]
    devices: tuple[str, ...]
    associations_requested: Callable[[], int]
    wake_dispatcher: Callable[[], None]
    echo_destination: Callable[[str, str | None], EchoAnswer] | None = None
    target_spacing_mm: Callable[[str], float | None] | None = None
    wake_retriever: Callable[[], None] | None = None
    intake: Intake | None = None
