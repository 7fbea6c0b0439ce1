//! The schema, as numbered steps. The database records the last step it
//! took (`PRAGMA user_version`); opening it takes the rest, in one
//! transaction each. A database from a newer Capsule is refused, never
//! downgraded.

/// Step N (1-based) is `STEPS[N - 1]`. Append; never edit a step that has
/// shipped.
pub(super) const STEPS: &[&str] = &[
    // 1: sandboxes, groups and the event log.
    r#"
    CREATE TABLE groups (
        name            TEXT PRIMARY KEY,
        max_sandboxes   INTEGER,
        max_vcpus       INTEGER,
        max_memory_mib  INTEGER,
        created_at      INTEGER NOT NULL
    ) STRICT;
    INSERT INTO groups (name, created_at) VALUES ('default', 0);

    CREATE TABLE sandboxes (
        id              TEXT PRIMARY KEY,
        group_name      TEXT NOT NULL REFERENCES groups(name),
        state           TEXT NOT NULL,
        source          TEXT NOT NULL,   -- JSON: what it was created from
        cpus            INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        labels          TEXT NOT NULL,   -- JSON object
        created_at      INTEGER NOT NULL,
        end_at          INTEGER,         -- when it expires, unix ms
        ended_at        INTEGER,
        end_reason      TEXT,
        end_detail      TEXT,
        vmm_pid         INTEGER,
        runtime_dir     TEXT
    ) STRICT;
    CREATE INDEX sandboxes_by_state ON sandboxes(state);
    CREATE INDEX sandboxes_by_group ON sandboxes(group_name, state);

    CREATE TABLE events (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        at              INTEGER NOT NULL,
        kind            TEXT NOT NULL,
        sandbox_id      TEXT,
        detail          TEXT NOT NULL    -- JSON
    ) STRICT;
    "#,
    // 2: secrets (sealed; the key is not in the database) and the names a
    // sandbox was given.
    r#"
    CREATE TABLE secrets (
        group_name      TEXT NOT NULL REFERENCES groups(name),
        name            TEXT NOT NULL,
        nonce           BLOB NOT NULL,
        sealed          BLOB NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        PRIMARY KEY (group_name, name)
    ) STRICT;
    ALTER TABLE sandboxes ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';
    "#,
    // 3: suspend after this long without a command (milliseconds).
    r#"
    ALTER TABLE sandboxes ADD COLUMN idle_suspend_ms INTEGER;
    "#,
    // 4: templates: primed snapshots sandboxes are restored from, made by
    // booting and running a command (kind 'template') or by snapshotting
    // a running sandbox (kind 'snapshot').
    r#"
    CREATE TABLE templates (
        name            TEXT PRIMARY KEY,
        kind            TEXT NOT NULL,
        cpus            INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        has_rootfs      INTEGER NOT NULL,
        source          TEXT NOT NULL,   -- JSON: what it was made from
        created_at      INTEGER NOT NULL
    ) STRICT;
    "#,
    // 5: prewarmed pools: how many restored sandboxes of a template to
    // keep ready.
    r#"
    CREATE TABLE pools (
        template        TEXT PRIMARY KEY REFERENCES templates(name) ON DELETE CASCADE,
        warm            INTEGER NOT NULL
    ) STRICT;
    "#,
    // 6: environment every command in the sandbox gets (JSON object; not
    // secret: secrets are sealed in their own table).
    r#"
    ALTER TABLE sandboxes ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
    "#,
    // 7: guest ports exposed on the host, kept while the sandbox is
    // suspended (and across daemon restarts) and opened again on resume.
    r#"
    CREATE TABLE ports (
        sandbox         TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        port            INTEGER NOT NULL,
        host_port       INTEGER NOT NULL,
        created_at      INTEGER NOT NULL,
        PRIMARY KEY (sandbox, port)
    ) STRICT;
    "#,
];
