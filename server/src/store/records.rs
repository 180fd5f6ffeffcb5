//! The records the coordinator stores ([`RunRecord`], [`ClientRecord`], [`RoundRecord`], [`LedgerRow`]) and
//! the store's error type, shared by the SQLite [`super::Store`] and the in-memory [`super::mem::MemStore`].
use std::io;
use std::path::PathBuf;

/// Errors of the coordinator's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// SQLite reported an error (including constraint violations such as a duplicate round attempt).
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A blob file's content does not hash to its name.
    #[error("corrupt blob {}: content sha256 is {actual}, expected {expected}", path.display())]
    Corrupt {
        /// The blob file.
        path: PathBuf,
        /// The hash the file is named by.
        expected: String,
        /// The hash of its content.
        actual: String,
    },
    /// A blob, run or other record does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A blob hash that is not 64 lowercase hex characters.
    #[error("invalid blob hash {0:?}: expected 64 lowercase hex characters")]
    BadHash(String),
    /// The database was written by a newer fedsb-server.
    #[error(
        "{}: schema version {found} is newer than this fedsb-server supports ({supported}); use a newer \
         fedsb-server or a fresh state directory",
        path.display()
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// The version recorded in the database.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// A record to write is inconsistent, or a stored row cannot be decoded.
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// A federated run, as recorded when the coordinator starts it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Unique id of the run.
    pub run_id: String,
    /// The run's specification (the coordinator's `RunSpec`), as JSON.
    pub spec_json: String,
    /// Content hash of the LoRA-SB init blob every client starts from.
    pub init_sha256: String,
    /// When the run was created (Unix milliseconds).
    pub created_unix_ms: u64,
    /// `"running"`, `"completed"` or `"failed"`.
    pub status: String,
    /// Human-readable detail for the status (empty, or the failure reason).
    pub message: String,
}

/// A client that joined a run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientRecord {
    /// The client's identity (its certificate's Common Name).
    pub client_id: String,
    /// Number of training examples the client reported.
    pub num_examples: u64,
    /// When the client first joined (Unix milliseconds).
    pub joined_unix_ms: u64,
    /// When the client was last heard from (Unix milliseconds).
    pub last_seen_unix_ms: u64,
}

/// One closed attempt of one round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// Round number (1-based; round 0 is the init download).
    pub round: u64,
    /// Attempt number within the round (a failed attempt is retried with the next number).
    pub attempt: u32,
    /// `"completed"` or `"failed"`.
    pub status: String,
    /// The new global adapter's blob hash; required for a completed round.
    pub global_sha256: Option<String>,
    /// When the round attempt opened (Unix milliseconds).
    pub opened_unix_ms: u64,
    /// When it closed (Unix milliseconds).
    pub closed_unix_ms: u64,
    /// Clients sampled for the round.
    pub sampled: Vec<String>,
    /// Sampled clients whose update was aggregated.
    pub contributed: Vec<String>,
    /// Sampled clients that sent no (accepted) update.
    pub lost: Vec<String>,
    /// Mean of the contributors' reported training losses, if any.
    pub mean_train_loss: Option<f64>,
    /// The coordinator's evaluation of the new global, as JSON.
    pub eval_json: Option<String>,
    /// FedEx-LoRA, FLoRA: the product blob clients fold into their base weights (written before the commit,
    /// like the global).
    pub product_sha256: Option<String>,
    /// DP-SGD: the contributors' privacy reports, as a JSON object by client id.
    pub privacy_json: Option<String>,
}

/// One row of the byte ledger; mirrors fedsb_common::comm::ledger::LedgerEntry but is defined here (plain
/// strings for direction/transfer) so the store does not depend on that module's evolution.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerRow {
    /// Round number (0 for the one-time init download).
    pub round: u64,
    /// The client the bytes went to or came from.
    pub client: String,
    /// `"up"` (client to coordinator) or `"down"`.
    pub direction: String,
    /// `"init"` (the init blob) or `"round"` (a global or an update).
    pub transfer: String,
    /// Bytes of the adapter payload (tensor data).
    pub payload_bytes: u64,
    /// Bytes of the encoded protocol messages carrying it.
    pub message_bytes: u64,
    /// Bytes measured on the wire, where measured.
    pub wire_bytes: Option<u64>,
    /// The analytic minimum for this transfer (from the method's communication plan).
    pub analytic_min_bytes: u64,
}
