//! The library's error type. Every fallible public function in `fedsb-common` returns [`Result`].
use std::path::PathBuf;

/// Errors of the fedsb library: bad input is reported with what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (config.json, a dataset line, adapter_config.json) could not be parsed.
    #[error("{context}: {source}")]
    Json {
        /// Where the JSON came from.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A model folder or file is malformed or of an unsupported kind.
    #[error("model: {0}")]
    Model(String),
    /// A tensor has the wrong name, shape or dtype, or is missing.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be built or failed on some text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A dataset is malformed (the message names file and line).
    #[error("data: {0}")]
    Data(String),
    /// An adapter configuration or file is invalid.
    #[error("adapter: {0}")]
    Adapter(String),
    /// A training or evaluation setting is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A numeric failure: a non-finite loss or gradient, or a failed factorization.
    #[error("numerics: {0}")]
    Numerics(String),
    /// The randomized SVD failed.
    #[error(transparent)]
    Svd(#[from] crate::adapter::svd::SvdError),
}

/// Result alias of the fedsb library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A tensor error for `name`.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }
}
