"""The kernel: what every layer of the node shares, and nothing else.

It sits between ``db`` (the schema) and ``inference`` and imports nothing of the project
but ``db`` (checked by import-linter, see ``.importlinter``):

- ``settings``: the node's settings model (``NodeSettings``) and how it is loaded;
- ``strict``: the one strict pydantic base every settings / rules / registry model uses;
- ``vocabulary``: the project's words as enums (series, job and outbox states, event
  kinds, phases, priorities, result types), documented where they are defined;
- ``uids``: DICOM UID checks and deterministic UID derivation;
- ``events``: the event log, the one writer of the ``events`` table;
- ``catalog``: the pipeline catalog (which models a pipeline runs on which inputs), read
  by routing and by every worker;
- ``retry``: the one retry policy type used by jobs and by sends;
- ``outbox``: the outbox, the one writer of the ``dispatches`` table (routing forwards,
  the job runner queues results, the dispatcher records outcomes, storage commitment
  confirms, an admin resends);
- ``webhooks``: job status webhooks, the one writer of the ``webhook_deliveries`` table
  (a job's end is recorded by the job queue, the node's sender records each POST).
"""
