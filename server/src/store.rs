//! The coordinator's durable state: one SQLite database (`state.sqlite`, via rusqlite with bundled SQLite) plus
//! content-addressed blob files (`blobs/<sha256>.safetensors`). Only this module touches SQLite.
//!
//! The coordinator reaches its state through the [`RunStore`] trait, implemented by [`Store`] and by its
//! in-memory twin [`mem::MemStore`] (unit tests of the coordinator's event handling, no files).
//!
//! # Layout
//!
//! ```text
//! <dir>/state.sqlite         runs, clients, rounds, byte ledger (WAL mode: also state.sqlite-wal / -shm)
//! <dir>/blobs/<sha256>.safetensors   adapters (init blob, each round's global), named by their content hash
//! ```
//!
//! # Schema (version 3; columns marked v2/v3 were added by those versions, older databases are migrated)
//!
//! ```sql
//! CREATE TABLE schema_version (version INTEGER NOT NULL);            -- exactly one row
//! CREATE TABLE runs (
//!     run_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL, init_sha256 TEXT NOT NULL,
//!     created_unix_ms INTEGER NOT NULL,
//!     status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')), message TEXT NOT NULL);
//! CREATE TABLE clients (
//!     run_id TEXT NOT NULL REFERENCES runs(run_id), client_id TEXT NOT NULL, num_examples INTEGER NOT NULL,
//!     joined_unix_ms INTEGER NOT NULL, last_seen_unix_ms INTEGER NOT NULL, PRIMARY KEY (run_id, client_id));
//! CREATE TABLE rounds (
//!     run_id TEXT NOT NULL REFERENCES runs(run_id), round INTEGER NOT NULL, attempt INTEGER NOT NULL,
//!     status TEXT NOT NULL CHECK (status IN ('completed', 'failed')), global_sha256 TEXT,
//!     opened_unix_ms INTEGER NOT NULL, closed_unix_ms INTEGER NOT NULL,
//!     sampled_json TEXT NOT NULL, contributed_json TEXT NOT NULL, lost_json TEXT NOT NULL,  -- JSON arrays of ids
//!     mean_train_loss REAL, eval_json TEXT,
//!     product_sha256 TEXT,                 -- FedEx-LoRA / FLoRA: the product blob folded into base weights (v2)
//!     privacy_json TEXT,                   -- DP-SGD: {client: DP report} of the contributors (v3)
//!     PRIMARY KEY (run_id, round, attempt));
//! CREATE TABLE ledger (
//!     id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(run_id), round INTEGER NOT NULL,
//!     attempt INTEGER,                     -- the round attempt (commit_round); NULL for rows from add_ledger
//!     client TEXT NOT NULL, direction TEXT NOT NULL CHECK (direction IN ('up', 'down')),
//!     transfer TEXT NOT NULL CHECK (transfer IN ('init', 'round')),
//!     payload_bytes INTEGER NOT NULL, message_bytes INTEGER NOT NULL, wire_bytes INTEGER,
//!     analytic_min_bytes INTEGER NOT NULL);
//! ```
//!
//! Integers are SQLite's signed 64-bit; a `u64` above `i64::MAX` is refused rather than wrapped.
//!
//! # Durability rules
//!
//! - The database runs with `journal_mode=WAL`, `synchronous=FULL` and `foreign_keys=ON`: a call that returned
//!   `Ok` survives a crash or power loss.
//! - A blob is written to a temporary file in `blobs/`, fsynced, renamed to its final name and the directory
//!   fsynced, so a blob file either is complete or does not exist under its final name. Blobs are verified
//!   against their name on every read ([`StoreError::Corrupt`]).
//! - Blobs are written **before** the rows that name them: [`Store::commit_round`] refuses a round whose global
//!   blob file is missing, and writes the round row and all of its ledger rows in one transaction, so a crash
//!   never leaves a half round. A crash between `put_blob` and `commit_round` at worst leaves an unreferenced
//!   blob file, which is harmless.
//! - A database whose `schema_version` is newer than this build's is refused at [`Store::open`].
//!
//! # Querying the ledger
//!
//! The database can be read with the `sqlite3` shell while the coordinator runs (WAL allows concurrent
//! readers). Bytes uploaded per client per round of the most recent run:
//!
//! ```sql
//! SELECT round, client,
//!        SUM(payload_bytes) AS payload, SUM(message_bytes) AS message, SUM(wire_bytes) AS wire,
//!        SUM(analytic_min_bytes) AS analytic_min
//! FROM ledger
//! WHERE run_id = (SELECT run_id FROM runs ORDER BY created_unix_ms DESC, rowid DESC LIMIT 1)
//!   AND direction = 'up'
//! GROUP BY round, client
//! ORDER BY round, client;
//! ```
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fedsb_common::wire::{is_sha256_hex, sha256_hex};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

pub mod mem;
mod records;

pub use records::{ClientRecord, LedgerRow, RoundRecord, RunRecord, StoreError};

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 3;

/// From version 1 to 2: the product blob of FedEx-LoRA / FLoRA rounds.
const MIGRATE_V2: &str = "ALTER TABLE rounds ADD COLUMN product_sha256 TEXT;";
/// From version 2 to 3: the contributors' DP reports of a round.
const MIGRATE_V3: &str = "ALTER TABLE rounds ADD COLUMN privacy_json TEXT;";

/// File name of the SQLite database inside the store directory.
const DB_FILE: &str = "state.sqlite";
/// Name of the blob folder inside the store directory.
const BLOB_DIR: &str = "blobs";
/// Extension of blob files.
const BLOB_EXT: &str = "safetensors";
/// Prefix of temporary blob files (never a valid blob name: blob names start with a hex digit).
const TMP_PREFIX: &str = ".tmp-";
/// Temporary blob files older than this are removed at `open` (left behind by a crash mid-write).
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

const SCHEMA_V1: &str = "
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    init_sha256 TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    message TEXT NOT NULL
);
CREATE TABLE clients (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    joined_unix_ms INTEGER NOT NULL,
    last_seen_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, client_id)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    global_sha256 TEXT,
    opened_unix_ms INTEGER NOT NULL,
    closed_unix_ms INTEGER NOT NULL,
    sampled_json TEXT NOT NULL,
    contributed_json TEXT NOT NULL,
    lost_json TEXT NOT NULL,
    mean_train_loss REAL,
    eval_json TEXT,
    PRIMARY KEY (run_id, round, attempt)
);
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    attempt INTEGER,
    client TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('up', 'down')),
    transfer TEXT NOT NULL CHECK (transfer IN ('init', 'round')),
    payload_bytes INTEGER NOT NULL,
    message_bytes INTEGER NOT NULL,
    wire_bytes INTEGER,
    analytic_min_bytes INTEGER NOT NULL
);
CREATE INDEX ledger_by_run_round ON ledger (run_id, round, client, direction);
";

/// The coordinator's durable state: a SQLite connection plus the blob folder. `Send`, not `Sync`: share it
/// behind a `Mutex`.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    db_path: PathBuf,
    blob_dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn to_json(v: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode id list: {e}")))
}

fn check_one_of(what: &str, value: &str, allowed: &[&str]) -> Result<(), StoreError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{what} {value:?} is not one of {allowed:?}")))
    }
}

/// Opens a file or folder and fsyncs it (folders: makes renames and creations in it durable).
fn fsync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Removes temporary blob files old enough that no live writer can own them.
fn remove_stale_tmp(blob_dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(blob_dir).map_err(io_err(blob_dir))? {
        let entry = entry.map_err(io_err(blob_dir))?;
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_TMP_AGE);
        if old {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed stale temporary blob file"),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove stale temporary blob"),
            }
        }
    }
    Ok(())
}

/// Raw values of a `rounds` row, decoded into a [`RoundRecord`] outside the row closure.
type RoundRow = (
    u64,
    u32,
    String,
    Option<String>,
    u64,
    u64,
    String,
    String,
    String,
    Option<f64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const ROUND_COLUMNS: &str = "round, attempt, status, global_sha256, opened_unix_ms, closed_unix_ms, sampled_json, \
                             contributed_json, lost_json, mean_train_loss, eval_json, product_sha256, privacy_json";

fn read_round_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RoundRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
        row.get(10)?,
        row.get(11)?,
        row.get(12)?,
    ))
}

fn decode_round(raw: RoundRow) -> Result<RoundRecord, StoreError> {
    let (
        round,
        attempt,
        status,
        global_sha256,
        opened,
        closed,
        sampled,
        contributed,
        lost,
        loss,
        eval,
        product,
        privacy,
    ) = raw;
    let list = |name: &str, json: &str| -> Result<Vec<String>, StoreError> {
        serde_json::from_str(json).map_err(|e| {
            StoreError::Invalid(format!("round {round} attempt {attempt}: column {name} is not a JSON list: {e}"))
        })
    };
    Ok(RoundRecord {
        round,
        attempt,
        status,
        global_sha256,
        opened_unix_ms: opened,
        closed_unix_ms: closed,
        sampled: list("sampled_json", &sampled)?,
        contributed: list("contributed_json", &contributed)?,
        lost: list("lost_json", &lost)?,
        mean_train_loss: loss,
        eval_json: eval,
        product_sha256: product,
        privacy_json: privacy,
    })
}

fn read_run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        run_id: row.get(0)?,
        spec_json: row.get(1)?,
        init_sha256: row.get(2)?,
        created_unix_ms: row.get(3)?,
        status: row.get(4)?,
        message: row.get(5)?,
    })
}

const RUN_COLUMNS: &str = "run_id, spec_json, init_sha256, created_unix_ms, status, message";

fn check_ledger_row(r: &LedgerRow) -> Result<(), StoreError> {
    check_one_of("ledger direction", &r.direction, &["up", "down"])?;
    check_one_of("ledger transfer", &r.transfer, &["init", "round"])
}

fn insert_ledger(
    tx: &Transaction<'_>,
    run_id: &str,
    attempt: Option<u32>,
    rows: &[LedgerRow],
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO ledger (run_id, round, attempt, client, direction, transfer, payload_bytes, message_bytes, \
         wire_bytes, analytic_min_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for r in rows {
        stmt.execute(params![
            run_id,
            r.round,
            attempt,
            r.client,
            r.direction,
            r.transfer,
            r.payload_bytes,
            r.message_bytes,
            r.wire_bytes,
            r.analytic_min_bytes
        ])?;
    }
    Ok(())
}

/// The checks of [`RunStore::commit_round`] made before anything is written, shared by [`Store`] and its twin:
/// the status, a completed round's global, that the blobs the round names exist (`blob_exists` answers
/// `Err(name)` for a missing one, `name` being what the error shows), and the ledger rows.
fn check_commit(
    r: &RoundRecord,
    ledger: &[LedgerRow],
    blob_exists: impl Fn(&str) -> Result<Result<(), String>, StoreError>,
) -> Result<(), StoreError> {
    check_one_of("round status", &r.status, &["completed", "failed"])?;
    if r.status == "completed" && r.global_sha256.is_none() {
        return Err(StoreError::Invalid(format!(
            "round {} attempt {}: completed without a global",
            r.round, r.attempt
        )));
    }
    for hash in r.global_sha256.iter().chain(&r.product_sha256) {
        if let Err(name) = blob_exists(hash)? {
            return Err(StoreError::NotFound(format!(
                "blob {name} of round {} (write it with put_blob before commit_round)",
                r.round
            )));
        }
    }
    for row in ledger {
        check_ledger_row(row)?;
        if row.round != r.round {
            return Err(StoreError::Invalid(format!(
                "ledger row for round {} committed with round {}",
                row.round, r.round
            )));
        }
    }
    Ok(())
}

fn require_run(tx: &Transaction<'_>, run_id: &str) -> Result<(), StoreError> {
    let found: Option<i64> = tx.query_row("SELECT 1 FROM runs WHERE run_id = ?1", [run_id], |r| r.get(0)).optional()?;
    found.map(|_| ()).ok_or_else(|| StoreError::NotFound(format!("run {run_id:?}")))
}

impl Store {
    /// Opens (creating if needed) `dir/state.sqlite` and `dir/blobs/`. WAL mode, synchronous=FULL, foreign keys
    /// on; creates the schema if absent (a `schema_version` table; refuse a newer version with a clear error).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let blob_dir = dir.join(BLOB_DIR);
        fs::create_dir_all(&blob_dir).map_err(io_err(&blob_dir))?;
        remove_stale_tmp(&blob_dir)?;
        let db_path = dir.join(DB_FILE);
        let conn = Connection::open(&db_path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!("{}: cannot enable WAL mode (got {mode})", db_path.display())));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;

        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")?;
        let versions: Vec<i64> =
            tx.prepare("SELECT version FROM schema_version")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        match versions.as_slice() {
            [] => {
                tx.execute_batch(SCHEMA_V1)?;
                tx.execute_batch(MIGRATE_V2)?;
                tx.execute_batch(MIGRATE_V3)?;
                tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])?;
            }
            [v @ (1 | 2)] => {
                if *v == 1 {
                    tx.execute_batch(MIGRATE_V2)?;
                }
                tx.execute_batch(MIGRATE_V3)?;
                tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])?;
            }
            [v] if *v == SCHEMA_VERSION => {}
            [v] if *v > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew { path: db_path, found: *v, supported: SCHEMA_VERSION });
            }
            other => {
                return Err(StoreError::Invalid(format!(
                    "{}: unexpected schema_version rows {other:?} (this build writes version {SCHEMA_VERSION})",
                    db_path.display()
                )));
            }
        }
        tx.commit()?;
        Ok(Store { conn, db_path, blob_dir })
    }

    /// Path of the SQLite database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Writes a blob durably (write to a temp file, fsync, rename to `blobs/<sha256>.safetensors`, fsync the
    /// dir) and returns its lowercase hex sha256. Idempotent.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = sha256_hex(bytes);
        let path = self.blob_path(&hash)?;
        // An intact existing copy makes this a no-op; a corrupt one is replaced.
        match self.get_blob(&hash) {
            Ok(_) => return Ok(hash),
            Err(StoreError::NotFound(_)) => {}
            Err(StoreError::Corrupt { .. }) => {
                tracing::warn!(path = %path.display(), "replacing corrupt blob file");
            }
            Err(e) => return Err(e),
        }

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = self.blob_dir.join(format!(
            "{TMP_PREFIX}{}-{}-{nanos}-{hash}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { path: tmp, source: e });
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { path, source: e });
        }
        fsync_path(&self.blob_dir)?;
        Ok(hash)
    }

    /// Reads a blob and checks its hash (StoreError::Corrupt on mismatch, NotFound if absent).
    pub fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(sha256)?;
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_err(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("blob {}", path.display())));
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(StoreError::Corrupt { path, expected: sha256.to_string(), actual });
        }
        Ok(bytes)
    }

    /// Path of a blob file (it may not exist). Rejects a sha256 that is not 64 lowercase hex chars (no path
    /// tricks).
    pub fn blob_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::BadHash(sha256.to_string()));
        }
        Ok(self.blob_dir.join(format!("{sha256}.{BLOB_EXT}")))
    }

    /// Records a new run (its `run_id` must be unused).
    pub fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        check_one_of("run status", &run.status, &["running", "completed", "failed"])?;
        self.conn.execute(
            "INSERT INTO runs (run_id, spec_json, init_sha256, created_unix_ms, status, message) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![run.run_id, run.spec_json, run.init_sha256, run.created_unix_ms, run.status, run.message],
        )?;
        Ok(())
    }

    /// The run with this id, if any.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1");
        Ok(self.conn.query_row(&sql, [run_id], read_run_row).optional()?)
    }

    /// The most recently created run.
    pub fn latest_run(&self) -> Result<Option<RunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY created_unix_ms DESC, rowid DESC LIMIT 1");
        Ok(self.conn.query_row(&sql, [], read_run_row).optional()?)
    }

    /// Sets a run's status (`"running"`, `"completed"` or `"failed"`) and message; NotFound for an unknown run.
    pub fn set_run_status(&self, run_id: &str, status: &str, message: &str) -> Result<(), StoreError> {
        check_one_of("run status", status, &["running", "completed", "failed"])?;
        let n = self
            .conn
            .execute("UPDATE runs SET status = ?2, message = ?3 WHERE run_id = ?1", params![run_id, status, message])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("run {run_id:?}")));
        }
        Ok(())
    }

    /// Inserts a client of a run, or updates its `num_examples` and `last_seen_unix_ms` if it is already
    /// recorded (its first `joined_unix_ms` is kept).
    pub fn upsert_client(&self, run_id: &str, c: &ClientRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO clients (run_id, client_id, num_examples, joined_unix_ms, last_seen_unix_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (run_id, client_id) DO UPDATE SET \
               num_examples = excluded.num_examples, last_seen_unix_ms = excluded.last_seen_unix_ms",
            params![run_id, c.client_id, c.num_examples, c.joined_unix_ms, c.last_seen_unix_ms],
        )?;
        Ok(())
    }

    /// The clients of a run, ordered by id.
    pub fn clients(&self, run_id: &str) -> Result<Vec<ClientRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT client_id, num_examples, joined_unix_ms, last_seen_unix_ms FROM clients WHERE run_id = ?1 \
             ORDER BY client_id",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok(ClientRecord {
                client_id: r.get(0)?,
                num_examples: r.get(1)?,
                joined_unix_ms: r.get(2)?,
                last_seen_unix_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Commits one round in ONE transaction: the round row (unique on (run_id, round, attempt)) and its ledger
    /// rows. The caller has already written the round's global blob with put_blob; commit_round checks that
    /// blob file exists when global_sha256 is Some (else error, nothing written). A crash therefore never
    /// leaves a half round.
    ///
    /// Also refused, with nothing written: an unknown run, a status other than `"completed"`/`"failed"`, a
    /// completed round without a global, a ledger row for another round, and a duplicate (round, attempt).
    pub fn commit_round(&self, run_id: &str, r: &RoundRecord, ledger: &[LedgerRow]) -> Result<(), StoreError> {
        check_commit(r, ledger, |hash| {
            let path = self.blob_path(hash)?;
            Ok(path.is_file().then_some(()).ok_or_else(|| path.display().to_string()))
        })?;
        let (sampled, contributed, lost) = (to_json(&r.sampled)?, to_json(&r.contributed)?, to_json(&r.lost)?);

        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        require_run(&tx, run_id)?;
        tx.execute(
            &format!(
                "INSERT INTO rounds (run_id, {ROUND_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                run_id,
                r.round,
                r.attempt,
                r.status,
                r.global_sha256,
                r.opened_unix_ms,
                r.closed_unix_ms,
                sampled,
                contributed,
                lost,
                r.mean_train_loss,
                r.eval_json,
                r.product_sha256,
                r.privacy_json
            ],
        )?;
        insert_ledger(&tx, run_id, Some(r.attempt), ledger)?;
        tx.commit()?;
        Ok(())
    }

    /// Records ledger rows outside a round (the one-time init downloads, round 0).
    pub fn add_ledger(&self, run_id: &str, rows: &[LedgerRow]) -> Result<(), StoreError> {
        for row in rows {
            check_ledger_row(row)?;
        }
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        require_run(&tx, run_id)?;
        insert_ledger(&tx, run_id, None, rows)?;
        tx.commit()?;
        Ok(())
    }

    /// All round attempts of a run, ordered by round, attempt.
    pub fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {ROUND_COLUMNS} FROM rounds WHERE run_id = ?1 ORDER BY round, attempt"))?;
        let raw = stmt.query_map([run_id], read_round_row)?.collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(decode_round).collect()
    }

    /// The last completed round (highest round number with status completed), for --resume.
    pub fn last_completed_round(&self, run_id: &str) -> Result<Option<RoundRecord>, StoreError> {
        let sql = format!(
            "SELECT {ROUND_COLUMNS} FROM rounds WHERE run_id = ?1 AND status = 'completed' \
             ORDER BY round DESC, attempt DESC LIMIT 1"
        );
        self.conn.query_row(&sql, [run_id], read_round_row).optional()?.map(decode_round).transpose()
    }

    /// The byte ledger of a run, ordered by round, client, direction (then transfer, then insertion order).
    pub fn ledger(&self, run_id: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, client, direction, transfer, payload_bytes, message_bytes, wire_bytes, analytic_min_bytes \
             FROM ledger WHERE run_id = ?1 ORDER BY round, client, direction, transfer, id",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok(LedgerRow {
                round: r.get(0)?,
                client: r.get(1)?,
                direction: r.get(2)?,
                transfer: r.get(3)?,
                payload_bytes: r.get(4)?,
                message_bytes: r.get(5)?,
                wire_bytes: r.get(6)?,
                analytic_min_bytes: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The durable state of a run, as the coordinator uses it: blobs by content hash, the run, its clients, its
/// rounds and its byte ledger. Implemented by [`Store`] (SQLite and blob files) and by [`mem::MemStore`] (memory,
/// for tests).
///
/// Failure semantics, which every implementation keeps: a call that returns `Ok` is durable for that
/// implementation; a call that returns `Err` wrote nothing (in particular [`RunStore::commit_round`] writes the
/// round and all of its ledger rows, or none of them); writes are refused with [`StoreError::NotFound`] for an
/// unknown run or a missing blob, [`StoreError::BadHash`] for a malformed hash and [`StoreError::Invalid`] for
/// an inconsistent record. A duplicate run id or round attempt is refused too ([`Store`]: as
/// [`StoreError::Sqlite`]). `Send`, not necessarily `Sync`: share it behind a `Mutex`.
pub trait RunStore: Send {
    /// Writes a blob durably and returns its lowercase hex sha256. Idempotent.
    fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError>;
    /// Reads a blob, checked against its hash.
    fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError>;
    /// Records a new run (its `run_id` must be unused).
    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError>;
    /// The run with this id, if any.
    fn run(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError>;
    /// The most recently created run.
    fn latest_run(&self) -> Result<Option<RunRecord>, StoreError>;
    /// Sets a run's status (`"running"`, `"completed"` or `"failed"`) and message.
    fn set_run_status(&self, run_id: &str, status: &str, message: &str) -> Result<(), StoreError>;
    /// Inserts a client of a run, or updates its `num_examples` and `last_seen_unix_ms` (keeping its first join).
    fn upsert_client(&self, run_id: &str, c: &ClientRecord) -> Result<(), StoreError>;
    /// The clients of a run, ordered by id.
    fn clients(&self, run_id: &str) -> Result<Vec<ClientRecord>, StoreError>;
    /// Commits one round attempt and its ledger rows atomically, after its blobs were written.
    fn commit_round(&self, run_id: &str, r: &RoundRecord, ledger: &[LedgerRow]) -> Result<(), StoreError>;
    /// Records ledger rows outside a round (the one-time init downloads, round 0).
    fn add_ledger(&self, run_id: &str, rows: &[LedgerRow]) -> Result<(), StoreError>;
    /// All round attempts of a run, ordered by round, attempt.
    fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, StoreError>;
    /// The last completed round (highest round number with status completed), for `--resume`.
    fn last_completed_round(&self, run_id: &str) -> Result<Option<RoundRecord>, StoreError>;
    /// The byte ledger of a run, ordered by round, client, direction, transfer, then insertion order.
    fn ledger(&self, run_id: &str) -> Result<Vec<LedgerRow>, StoreError>;
}

impl RunStore for Store {
    fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        Store::put_blob(self, bytes)
    }
    fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        Store::get_blob(self, sha256)
    }
    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        Store::create_run(self, run)
    }
    fn run(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        Store::run(self, run_id)
    }
    fn latest_run(&self) -> Result<Option<RunRecord>, StoreError> {
        Store::latest_run(self)
    }
    fn set_run_status(&self, run_id: &str, status: &str, message: &str) -> Result<(), StoreError> {
        Store::set_run_status(self, run_id, status, message)
    }
    fn upsert_client(&self, run_id: &str, c: &ClientRecord) -> Result<(), StoreError> {
        Store::upsert_client(self, run_id, c)
    }
    fn clients(&self, run_id: &str) -> Result<Vec<ClientRecord>, StoreError> {
        Store::clients(self, run_id)
    }
    fn commit_round(&self, run_id: &str, r: &RoundRecord, ledger: &[LedgerRow]) -> Result<(), StoreError> {
        Store::commit_round(self, run_id, r, ledger)
    }
    fn add_ledger(&self, run_id: &str, rows: &[LedgerRow]) -> Result<(), StoreError> {
        Store::add_ledger(self, run_id, rows)
    }
    fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, StoreError> {
        Store::rounds(self, run_id)
    }
    fn last_completed_round(&self, run_id: &str) -> Result<Option<RoundRecord>, StoreError> {
        Store::last_completed_round(self, run_id)
    }
    fn ledger(&self, run_id: &str) -> Result<Vec<LedgerRow>, StoreError> {
        Store::ledger(self, run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn store_is_send() {
        assert_send::<Store>();
    }

    fn run_record(id: &str, created: u64) -> RunRecord {
        RunRecord {
            run_id: id.into(),
            spec_json: r#"{"method":"fedsb","rounds":3}"#.into(),
            init_sha256: "ab".repeat(32),
            created_unix_ms: created,
            status: "running".into(),
            message: String::new(),
        }
    }

    fn round_record(round: u64, attempt: u32, status: &str, global: Option<String>) -> RoundRecord {
        RoundRecord {
            round,
            attempt,
            status: status.into(),
            global_sha256: global,
            opened_unix_ms: 1000 + round,
            closed_unix_ms: 2000 + round,
            sampled: vec!["alice".into(), "bob".into(), "carol".into()],
            contributed: vec!["alice".into(), "bob".into()],
            lost: vec!["carol".into()],
            mean_train_loss: Some(0.25 + round as f64),
            eval_json: Some(r#"{"accuracy":0.9}"#.into()),
            product_sha256: None,
            privacy_json: None,
        }
    }

    fn ledger_row(round: u64, client: &str, direction: &str, transfer: &str, bytes: u64) -> LedgerRow {
        LedgerRow {
            round,
            client: client.into(),
            direction: direction.into(),
            transfer: transfer.into(),
            payload_bytes: bytes,
            message_bytes: bytes + 40,
            wire_bytes: if direction == "up" { Some(bytes + 100) } else { None },
            analytic_min_bytes: bytes,
        }
    }

    #[test]
    fn blob_roundtrip_idempotence_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"not really safetensors".to_vec();
        let hash = store.put_blob(&data).unwrap();
        assert_eq!(hash, sha256_hex(&data));
        assert!(is_sha256_hex(&hash));
        assert_eq!(store.get_blob(&hash).unwrap(), data);
        let path = store.blob_path(&hash).unwrap();
        assert_eq!(path, dir.path().join("blobs").join(format!("{hash}.safetensors")));
        assert!(path.is_file());

        // Idempotent: same hash, same single file, no temporaries left behind.
        assert_eq!(store.put_blob(&data).unwrap(), hash);
        let names: Vec<String> = fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![format!("{hash}.safetensors")]);

        // Corruption is detected on read, and a put repairs it.
        fs::write(&path, b"tampered").unwrap();
        match store.get_blob(&hash) {
            Err(StoreError::Corrupt { expected, actual, .. }) => {
                assert_eq!(expected, hash);
                assert_eq!(actual, sha256_hex(b"tampered"));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(store.put_blob(&data).unwrap(), hash);
        assert_eq!(store.get_blob(&hash).unwrap(), data);

        // Absent blob.
        let absent = sha256_hex(b"absent");
        assert!(matches!(store.get_blob(&absent), Err(StoreError::NotFound(_))));

        // Empty blob is fine.
        let empty = store.put_blob(&[]).unwrap();
        assert_eq!(store.get_blob(&empty).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn bad_hashes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = "0".repeat(64);
        assert!(store.blob_path(&good).is_ok());
        for bad in [
            String::new(),
            "0".repeat(63),
            "0".repeat(65),
            "A".repeat(64),
            "g".repeat(64),
            format!("../{}", "0".repeat(61)),
            format!("{}/..", "0".repeat(61)),
            format!("{}\0", "0".repeat(63)),
            format!("/{}", "0".repeat(63)),
        ] {
            assert!(matches!(store.blob_path(&bad), Err(StoreError::BadHash(_))), "{bad:?}");
            assert!(matches!(store.get_blob(&bad), Err(StoreError::BadHash(_))), "{bad:?}");
        }
        let mut r = round_record(1, 0, "completed", Some("../etc/passwd".into()));
        assert!(matches!(store.commit_round("x", &r, &[]), Err(StoreError::BadHash(_))));
        r.global_sha256 = Some("F".repeat(64));
        assert!(matches!(store.commit_round("x", &r, &[]), Err(StoreError::BadHash(_))));
    }

    fn populate(store: &dyn RunStore) -> (String, String) {
        store.create_run(&run_record("run-a", 10)).unwrap();
        store.create_run(&run_record("run-b", 20)).unwrap();
        store
            .upsert_client(
                "run-b",
                &ClientRecord {
                    client_id: "bob".into(),
                    num_examples: 50,
                    joined_unix_ms: 100,
                    last_seen_unix_ms: 100,
                },
            )
            .unwrap();
        store
            .upsert_client(
                "run-b",
                &ClientRecord {
                    client_id: "alice".into(),
                    num_examples: 70,
                    joined_unix_ms: 110,
                    last_seen_unix_ms: 110,
                },
            )
            .unwrap();
        // Re-join: num_examples and last_seen updated, first join kept.
        store
            .upsert_client(
                "run-b",
                &ClientRecord {
                    client_id: "bob".into(),
                    num_examples: 55,
                    joined_unix_ms: 300,
                    last_seen_unix_ms: 300,
                },
            )
            .unwrap();
        store
            .add_ledger(
                "run-b",
                &[ledger_row(0, "bob", "down", "init", 4096), ledger_row(0, "alice", "down", "init", 4096)],
            )
            .unwrap();
        let g1 = store.put_blob(b"global 1").unwrap();
        let g2 = store.put_blob(b"global 2").unwrap();
        store
            .commit_round(
                "run-b",
                &round_record(1, 0, "completed", Some(g1.clone())),
                &[
                    ledger_row(1, "bob", "up", "round", 100),
                    ledger_row(1, "alice", "up", "round", 100),
                    ledger_row(1, "alice", "down", "round", 100),
                    ledger_row(1, "bob", "down", "round", 100),
                ],
            )
            .unwrap();
        store
            .commit_round("run-b", &round_record(2, 0, "failed", None), &[ledger_row(2, "bob", "down", "round", 7)])
            .unwrap();
        store.commit_round("run-b", &round_record(2, 1, "completed", Some(g2.clone())), &[]).unwrap();
        (g1, g2)
    }

    fn check_populated(store: &dyn RunStore, g1: &str, g2: &str) {
        assert_eq!(store.run("run-a").unwrap(), Some(run_record("run-a", 10)));
        assert_eq!(store.run("nope").unwrap(), None);
        assert_eq!(store.latest_run().unwrap().unwrap().run_id, "run-b");
        assert_eq!(
            store.clients("run-b").unwrap(),
            vec![
                ClientRecord {
                    client_id: "alice".into(),
                    num_examples: 70,
                    joined_unix_ms: 110,
                    last_seen_unix_ms: 110
                },
                ClientRecord { client_id: "bob".into(), num_examples: 55, joined_unix_ms: 100, last_seen_unix_ms: 300 },
            ]
        );
        assert!(store.clients("run-a").unwrap().is_empty());
        assert_eq!(
            store.rounds("run-b").unwrap(),
            vec![
                round_record(1, 0, "completed", Some(g1.to_string())),
                round_record(2, 0, "failed", None),
                round_record(2, 1, "completed", Some(g2.to_string())),
            ]
        );
        assert!(store.rounds("run-a").unwrap().is_empty());
        assert_eq!(
            store.ledger("run-b").unwrap(),
            vec![
                ledger_row(0, "alice", "down", "init", 4096),
                ledger_row(0, "bob", "down", "init", 4096),
                ledger_row(1, "alice", "down", "round", 100),
                ledger_row(1, "alice", "up", "round", 100),
                ledger_row(1, "bob", "down", "round", 100),
                ledger_row(1, "bob", "up", "round", 100),
                ledger_row(2, "bob", "down", "round", 7),
            ]
        );
        assert_eq!(store.get_blob(g1).unwrap(), b"global 1");
    }

    #[test]
    fn records_roundtrip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (g1, g2) = {
            let store = Store::open(dir.path()).unwrap();
            let gs = populate(&store);
            check_populated(&store, &gs.0, &gs.1);
            gs
        };
        let store = Store::open(dir.path()).unwrap();
        check_populated(&store, &g1, &g2);
        store.set_run_status("run-a", "failed", "lost quorum").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let a = store.run("run-a").unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.message.as_str()), ("failed", "lost quorum"));
        assert!(matches!(store.set_run_status("nope", "failed", ""), Err(StoreError::NotFound(_))));
        assert!(matches!(store.set_run_status("run-a", "paused", ""), Err(StoreError::Invalid(_))));
        // Duplicate run id is refused.
        assert!(matches!(store.create_run(&run_record("run-a", 99)), Err(StoreError::Sqlite(_))));
    }

    #[test]
    fn the_in_memory_twin_keeps_the_same_records() {
        let store = mem::MemStore::new();
        let (g1, g2) = populate(&store);
        check_populated(&store, &g1, &g2);
        assert_eq!(store.last_completed_round("run-b").unwrap(), Some(round_record(2, 1, "completed", Some(g2))));
        store.set_run_status("run-a", "failed", "lost quorum").unwrap();
        let a = store.run("run-a").unwrap().unwrap();
        assert_eq!((a.status.as_str(), a.message.as_str()), ("failed", "lost quorum"));
        assert!(matches!(store.set_run_status("nope", "failed", ""), Err(StoreError::NotFound(_))));
        assert!(matches!(store.set_run_status("run-a", "paused", ""), Err(StoreError::Invalid(_))));
        assert!(store.create_run(&run_record("run-a", 99)).is_err());
        assert!(matches!(store.get_blob(&"A".repeat(64)), Err(StoreError::BadHash(_))));
        assert!(matches!(store.get_blob(&sha256_hex(b"absent")), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn the_in_memory_twin_refuses_what_the_store_refuses() {
        let store = mem::MemStore::new();
        store.create_run(&run_record("r", 1)).unwrap();
        let ledger = [ledger_row(1, "alice", "up", "round", 10)];
        let missing = sha256_hex(b"never written");
        let err = store.commit_round("r", &round_record(1, 0, "completed", Some(missing)), &ledger).unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        let g = store.put_blob(b"g").unwrap();
        let ok = round_record(1, 0, "completed", Some(g));
        let mut no_global = ok.clone();
        no_global.global_sha256 = None;
        assert!(matches!(store.commit_round("r", &no_global, &ledger), Err(StoreError::Invalid(_))));
        let mut bad_status = ok.clone();
        bad_status.status = "running".into();
        assert!(matches!(store.commit_round("r", &bad_status, &ledger), Err(StoreError::Invalid(_))));
        assert!(matches!(
            store.commit_round("r", &ok, &[ledger_row(2, "alice", "up", "round", 1)]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(store.commit_round("nope", &ok, &ledger), Err(StoreError::NotFound(_))));
        assert!(matches!(store.add_ledger("nope", &ledger), Err(StoreError::NotFound(_))));
        let mut huge = ledger_row(1, "bob", "up", "round", 1);
        huge.payload_bytes = u64::MAX;
        assert!(store.commit_round("r", &ok, &[ledger[0].clone(), huge]).is_err());
        assert!(store.rounds("r").unwrap().is_empty());
        assert!(store.ledger("r").unwrap().is_empty());
        store.commit_round("r", &ok, &ledger).unwrap();
        assert!(store.commit_round("r", &ok, &ledger).is_err());
        assert_eq!(store.rounds("r").unwrap(), vec![ok]);
        assert_eq!(store.ledger("r").unwrap(), ledger.to_vec());
        let writes: Vec<mem::StoreCall> = store.calls();
        assert_eq!(
            writes,
            vec![
                mem::StoreCall::CreateRun("r".into()),
                mem::StoreCall::PutBlob(sha256_hex(b"g")),
                mem::StoreCall::CommitRound { round: 1, attempt: 0, status: "completed".into(), ledger_rows: 1 },
            ],
            "refused writes are not logged"
        );
    }

    #[test]
    fn last_completed_round_skips_failed_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_run(&run_record("r", 1)).unwrap();
        assert_eq!(store.last_completed_round("r").unwrap(), None);
        let g1 = store.put_blob(b"g1").unwrap();
        store.commit_round("r", &round_record(1, 0, "completed", Some(g1.clone())), &[]).unwrap();
        store.commit_round("r", &round_record(2, 0, "failed", None), &[]).unwrap();
        store.commit_round("r", &round_record(2, 1, "failed", None), &[]).unwrap();
        assert_eq!(store.last_completed_round("r").unwrap(), Some(round_record(1, 0, "completed", Some(g1))));
        let g2 = store.put_blob(b"g2").unwrap();
        store.commit_round("r", &round_record(2, 2, "completed", Some(g2.clone())), &[]).unwrap();
        store.commit_round("r", &round_record(3, 0, "failed", None), &[]).unwrap();
        assert_eq!(store.last_completed_round("r").unwrap(), Some(round_record(2, 2, "completed", Some(g2))));
    }

    #[test]
    fn refused_commits_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_run(&run_record("r", 1)).unwrap();
        let ledger = [ledger_row(1, "alice", "up", "round", 10)];

        // Missing global blob.
        let missing = sha256_hex(b"never written");
        let err = store.commit_round("r", &round_record(1, 0, "completed", Some(missing)), &ledger).unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        assert!(store.rounds("r").unwrap().is_empty());
        assert!(store.ledger("r").unwrap().is_empty());

        let g = store.put_blob(b"g").unwrap();
        let ok = round_record(1, 0, "completed", Some(g.clone()));
        // Completed without a global, bad status, mismatched ledger round, bad direction, unknown run.
        let mut no_global = ok.clone();
        no_global.global_sha256 = None;
        assert!(matches!(store.commit_round("r", &no_global, &ledger), Err(StoreError::Invalid(_))));
        let mut bad_status = ok.clone();
        bad_status.status = "running".into();
        assert!(matches!(store.commit_round("r", &bad_status, &ledger), Err(StoreError::Invalid(_))));
        assert!(matches!(
            store.commit_round("r", &ok, &[ledger_row(2, "alice", "up", "round", 1)]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.commit_round("r", &ok, &[ledger_row(1, "alice", "sideways", "round", 1)]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(store.commit_round("nope", &ok, &ledger), Err(StoreError::NotFound(_))));
        assert!(matches!(store.add_ledger("nope", &ledger), Err(StoreError::NotFound(_))));
        // A u64 beyond SQLite's i64 range is refused, inside the transaction: rolled back.
        let mut huge = ledger_row(1, "bob", "up", "round", 1);
        huge.payload_bytes = u64::MAX;
        assert!(store.commit_round("r", &ok, &[ledger[0].clone(), huge]).is_err());
        assert!(store.rounds("r").unwrap().is_empty());
        assert!(store.ledger("r").unwrap().is_empty());

        // The good commit, then a duplicate (round, attempt) is refused and adds no ledger rows.
        store.commit_round("r", &ok, &ledger).unwrap();
        assert!(matches!(store.commit_round("r", &ok, &ledger), Err(StoreError::Sqlite(_))));
        assert_eq!(store.rounds("r").unwrap(), vec![ok]);
        assert_eq!(store.ledger("r").unwrap(), ledger.to_vec());
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rounds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL);").unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute("INSERT INTO schema_version (version) VALUES (1)", []).unwrap();
            conn.execute("INSERT INTO runs VALUES ('r', '{}', ?1, 1, 'running', '')", [&"a".repeat(64)]).unwrap();
            conn.execute(
                "INSERT INTO rounds (run_id, round, attempt, status, global_sha256, opened_unix_ms, closed_unix_ms, \
                 sampled_json, contributed_json, lost_json) VALUES ('r', 1, 0, 'failed', NULL, 1, 2, '[]', '[]', '[]')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rounds = store.rounds("r").unwrap();
        assert_eq!((rounds.len(), rounds[0].product_sha256.clone()), (1, None));
        let v: i64 = store.conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn a_version_2_database_gains_the_privacy_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL);").unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(MIGRATE_V2).unwrap();
            conn.execute("INSERT INTO schema_version (version) VALUES (2)", []).unwrap();
            conn.execute("INSERT INTO runs VALUES ('r', '{}', ?1, 1, 'running', '')", [&"a".repeat(64)]).unwrap();
            conn.execute(
                "INSERT INTO rounds (run_id, round, attempt, status, global_sha256, opened_unix_ms, closed_unix_ms, \
                 sampled_json, contributed_json, lost_json, product_sha256) \
                 VALUES ('r', 1, 0, 'failed', NULL, 1, 2, '[]', '[]', '[]', NULL)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rounds = store.rounds("r").unwrap();
        assert_eq!((rounds.len(), rounds[0].privacy_json.clone()), (1, None));
        let mut r = round_record(2, 0, "failed", None);
        r.privacy_json = Some(r#"{"c1":{"epsilon":1.5}}"#.into());
        store.commit_round("r", &r, &[]).unwrap();
        assert_eq!(store.rounds("r").unwrap()[1].privacy_json, r.privacy_json);
        let v: i64 = store.conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION + 1]).unwrap();
        }
        match Store::open(dir.path()) {
            Err(e @ StoreError::SchemaTooNew { found, supported, .. }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
                assert!(e.to_string().contains("newer than this fedsb-server supports"), "{e}");
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[test]
    fn stale_temporaries_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let stale = dir.path().join("blobs").join(format!("{TMP_PREFIX}stale"));
        let fresh = dir.path().join("blobs").join(format!("{TMP_PREFIX}fresh"));
        fs::write(&stale, b"x").unwrap();
        fs::write(&fresh, b"x").unwrap();
        let old = SystemTime::now() - 2 * STALE_TMP_AGE;
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        drop(Store::open(dir.path()).unwrap());
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
