//! The communication planner: what one round of a federated LoRA method costs, per client and in total, from
//! a model's Hugging Face `config.json` alone (no weights), so users can size a federation before running it
//! and reproduce the Fed-SB paper's `# Comm.` columns (method.md §4-5).
//!
//! Per adapted matrix `W0 ∈ R^{d×k}` (d = out, k = in), rank r, c clients, values per round and client:
//!
//! | method | up | down | one-time download |
//! |---|---|---|---|
//! | `fedit` | r(d+k) | r(d+k) | – |
//! | `ffa-lora` | d·r (B only; A is frozen from a shared seed) | d·r | – |
//! | `fedex-lora` | r(d+k) | r(d+k) + min(c·r(d+k), d·k) (the residual, stacked factors or dense) | – |
//! | `flora` | r(d+k) | min(c·r(d+k), d·k) (the stacked product to merge; adapters re-initialized) | – |
//! | `fedsb` | r² | r² | r(d+k) + r² (B, A, R0) |
//!
//! A trainable classification head (encoders) travels both ways with every method.
//!
//! The paper's `# Comm.` ("parameters communicated per round") is: FedIT's upload; FFA-LoRA's printed as half of
//! FedIT (an approximation — [`Plan::paper_comm`] gives the exact B-only count, see [`Plan::paper_note`]);
//! FedEx-LoRA and FLoRA as c × FedIT (the adapter part; the head once); Fed-SB's upload.
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// A federated LoRA method (its home is [`crate::method`]).
pub use crate::method::Method;

/// One adapted matrix kind of a layer: its module name and shape (out × in).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleShape {
    /// Module kind, e.g. `q` or `attention.output.dense`.
    pub name: String,
    /// Output features d.
    pub d_out: u64,
    /// Input features k.
    pub d_in: u64,
}

/// The shapes a plan needs, read from a `config.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    /// `model_type` of the config.
    pub model_type: String,
    /// Transformer layers.
    pub layers: u64,
    /// Every adaptable module kind of a layer.
    pub modules: Vec<ModuleShape>,
    /// Hidden size (the classifier's input).
    pub hidden: u64,
    /// Whether the model is an encoder with a classification head.
    pub encoder: bool,
}

fn field(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn need(v: &Value, key: &str) -> Result<u64> {
    field(v, key).ok_or_else(|| Error::Config(format!("config.json lacks `{key}`")))
}

impl ModelShape {
    /// Reads the shapes from a Hugging Face `config.json` (decoders: llama, mistral, qwen2, gemma, gemma2, ...;
    /// encoders: bert and its relatives). `head_dim` is taken from the config when present (Gemma-2's is not
    /// hidden/heads).
    pub fn from_config_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let sane = |key: &str| -> Result<u64> {
            let x = need(v, key)?;
            if x == 0 || x > 1 << 32 {
                return Err(Error::Config(format!("config.json: `{key}` = {x} is out of range")));
            }
            Ok(x)
        };
        let layers = sane("num_hidden_layers")?;
        let hidden = sane("hidden_size")?;
        let ffn = sane("intermediate_size")?;
        let heads = sane("num_attention_heads")?;
        let m = |name: &str, d_out: u64, d_in: u64| ModuleShape { name: name.into(), d_out, d_in };
        let encoder = matches!(model_type.as_str(), "bert" | "roberta" | "xlm-roberta" | "electra");
        let modules = if encoder {
            vec![
                m("query", hidden, hidden),
                m("key", hidden, hidden),
                m("value", hidden, hidden),
                m("attention.output.dense", hidden, hidden),
                m("intermediate.dense", ffn, hidden),
                m("output.dense", hidden, ffn),
            ]
        } else {
            let kv_heads = if v.get("num_key_value_heads").is_some() { sane("num_key_value_heads")? } else { heads };
            let head_dim = if v.get("head_dim").is_some() { sane("head_dim")? } else { hidden / heads };
            let (q, kv) = match (heads.checked_mul(head_dim), kv_heads.checked_mul(head_dim)) {
                (Some(q), Some(kv)) => (q, kv),
                _ => return Err(Error::Config("config.json: heads × head_dim overflows".into())),
            };
            vec![
                m("q", q, hidden),
                m("k", kv, hidden),
                m("v", kv, hidden),
                m("o", hidden, q),
                m("gate", ffn, hidden),
                m("up", ffn, hidden),
                m("down", hidden, ffn),
            ]
        };
        Ok(Self { model_type, layers, modules, hidden, encoder })
    }

    /// Reads `path` (a `config.json`, or a model folder holding one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::Json { context: file.display().to_string(), source: e })?;
        Self::from_config_json(&v)
    }

    /// The default target modules (fedsb's defaults for the model kind).
    pub fn default_targets(&self) -> Vec<String> {
        let t: &[&str] = if self.encoder {
            &["query", "value", "attention.output.dense", "output.dense"]
        } else {
            &["q", "k", "v", "o", "gate", "up", "down"]
        };
        t.iter().map(|s| s.to_string()).collect()
    }
}

/// What to plan.
#[derive(Clone, Debug)]
pub struct PlanSpec {
    /// The method.
    pub method: Method,
    /// The rank r.
    pub rank: u64,
    /// Target module kinds (names of [`ModuleShape`]).
    pub targets: Vec<String>,
    /// Clients per round c.
    pub clients: u64,
    /// Bytes per value on the wire (4 for f32, 2 for bf16/f16).
    pub bytes_per_value: u64,
    /// Classes of a trainable classification head (encoders; 0: none).
    pub num_labels: u64,
}

/// The per-round cost of one method on one model (values; multiply by `bytes_per_value` for bytes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The method.
    pub method: Method,
    /// The rank.
    pub rank: u64,
    /// Clients per round.
    pub clients: u64,
    /// Adapted matrices (layers × targets).
    pub adapted_matrices: u64,
    /// Values of the classification head (0 when none).
    pub head_values: u64,
    /// Values each client uploads per round.
    pub up_per_client: u64,
    /// Values each client downloads per round.
    pub down_per_client: u64,
    /// Values each client downloads once, before round 1 (Fed-SB: B, A and R0; the head comes with the
    /// round-1 global).
    pub init_download_per_client: u64,
    /// Trainable values on each client.
    pub trainable_per_client: u64,
    /// Bytes per value.
    pub bytes_per_value: u64,
}

impl Plan {
    /// The cost of `spec` on `shape`. Errors on an unknown target or a rank the matrices cannot have (Fed-SB's
    /// B and A need r ≤ min(d, k)).
    pub fn new(shape: &ModelShape, spec: &PlanSpec) -> Result<Self> {
        if spec.rank == 0 || spec.clients == 0 || spec.bytes_per_value == 0 {
            return Err(Error::Config("rank, clients and bytes per value must be positive".into()));
        }
        if spec.rank > 1 << 20 || spec.clients > 1 << 32 || spec.num_labels > 1 << 32 {
            return Err(Error::Config("rank (≤ 2^20), clients and labels (≤ 2^32) out of range".into()));
        }
        let mut per_layer = Vec::new();
        for t in &spec.targets {
            let m = shape.modules.iter().find(|m| &m.name == t).ok_or_else(|| {
                let known: Vec<&str> = shape.modules.iter().map(|m| m.name.as_str()).collect();
                Error::Config(format!(
                    "unknown target module `{t}` for a {} model (known: {})",
                    shape.model_type,
                    known.join(",")
                ))
            })?;
            if spec.method == Method::FedSb && spec.rank > m.d_out.min(m.d_in) {
                return Err(Error::Config(format!(
                    "rank {} exceeds min(d, k) = {} of `{t}` ({}×{})",
                    spec.rank,
                    m.d_out.min(m.d_in),
                    m.d_out,
                    m.d_in
                )));
            }
            per_layer.push(m.clone());
        }
        // u128 throughout: absurd inputs (from a CLI or a config file) give an error, never a wrapped number.
        let (r, c, l) = (u128::from(spec.rank), u128::from(spec.clients), u128::from(shape.layers));
        let (hidden, labels) = (u128::from(shape.hidden), u128::from(spec.num_labels));
        let head = if shape.encoder && labels > 0 { labels * hidden + labels } else { 0 };
        let sum = |f: &dyn Fn(u128, u128) -> u128| -> u128 {
            l * per_layer.iter().map(|m| f(u128::from(m.d_out), u128::from(m.d_in))).sum::<u128>()
        };
        let lora = sum(&|d, k| r * (d + k));
        let stacked_or_dense = sum(&|d, k| (c * r * (d + k)).min(d * k));
        let (up, down, init, trainable) = match spec.method {
            Method::FedIt => (lora, lora, 0, lora),
            Method::FfaLora => {
                let b = sum(&|d, _| d * r);
                (b, b, 0, b)
            }
            Method::FedExLora => (lora, lora + stacked_or_dense, 0, lora),
            Method::FLora => (lora, stacked_or_dense, 0, lora),
            Method::FedSb => {
                let rr = sum(&|_, _| r * r);
                (rr, rr, lora + rr, rr)
            }
        };
        let fit = |x: u128| {
            // The paper figure multiplies by c once more; keep that within u64 too.
            u64::try_from(x.saturating_mul(c.max(1))).map(|_| x as u64).map_err(|_| {
                Error::Config(format!("the plan's counts overflow (rank {}, {} clients)", spec.rank, spec.clients))
            })
        };
        Ok(Self {
            method: spec.method,
            rank: spec.rank,
            clients: spec.clients,
            adapted_matrices: fit(l * per_layer.len() as u128)?,
            head_values: fit(head)?,
            up_per_client: fit(up + head)?,
            down_per_client: fit(down + head)?,
            init_download_per_client: fit(init)?,
            trainable_per_client: fit(trainable + head)?,
            bytes_per_value: spec.bytes_per_value,
        })
    }

    /// The paper's `# Comm.` figure: parameters communicated per round (see the module docs). For FFA-LoRA this
    /// is the exact B-only count; the paper prints half of FedIT.
    pub fn paper_comm(&self) -> u64 {
        match self.method {
            Method::FedIt | Method::FfaLora | Method::FedSb => self.up_per_client,
            Method::FedExLora | Method::FLora => {
                self.clients * (self.up_per_client - self.head_values) + self.head_values
            }
        }
    }

    /// A caveat to print beside [`Plan::paper_comm`], when there is one.
    pub fn paper_note(&self) -> Option<&'static str> {
        match self.method {
            Method::FfaLora => Some(
                "# Comm. is the exact B-only count; the paper's tables print half of FedIT, equal only for square matrices",
            ),
            Method::FedExLora | Method::FLora => Some(
                "# Comm. is the paper's c × FedIT; the download above sends the dense d·k of a matrix when smaller",
            ),
            _ => None,
        }
    }

    /// Bytes each client uploads per round.
    pub fn up_bytes(&self) -> u64 {
        self.up_per_client.saturating_mul(self.bytes_per_value)
    }

    /// Bytes each client downloads per round.
    pub fn down_bytes(&self) -> u64 {
        self.down_per_client.saturating_mul(self.bytes_per_value)
    }

    /// Bytes each client downloads once.
    pub fn init_bytes(&self) -> u64 {
        self.init_download_per_client.saturating_mul(self.bytes_per_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_3b() -> ModelShape {
        ModelShape::from_config_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
            "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28
        }))
        .unwrap()
    }

    fn spec(method: Method, rank: u64, shape: &ModelShape) -> PlanSpec {
        PlanSpec { method, rank, targets: shape.default_targets(), clients: 5, bytes_per_value: 4, num_labels: 0 }
    }

    #[test]
    fn fedsb_travels_r_squared_per_matrix_and_b_a_once() {
        let s = llama_3b();
        let p = Plan::new(&s, &spec(Method::FedSb, 64, &s)).unwrap();
        assert_eq!(p.adapted_matrices, 196);
        assert_eq!(p.up_per_client, 802_816, "the load benchmark's adapter");
        assert_eq!(p.down_per_client, 802_816);
        let lora = Plan::new(&s, &spec(Method::FedIt, 64, &s)).unwrap();
        assert_eq!(p.init_download_per_client, lora.up_per_client + 802_816);
        assert_eq!(p.up_bytes(), 802_816 * 4);
    }

    #[test]
    fn ffa_is_b_only_and_fedex_flora_cap_at_dense() {
        let s = llama_3b();
        let fedit = Plan::new(&s, &spec(Method::FedIt, 32, &s)).unwrap();
        let ffa = Plan::new(&s, &spec(Method::FfaLora, 32, &s)).unwrap();
        assert!(ffa.up_per_client < fedit.up_per_client);
        // With many clients the stacked factors exceed the dense matrix, and the dense one is sent.
        let mut sp = spec(Method::FLora, 32, &s);
        sp.clients = 1000;
        let flora = Plan::new(&s, &sp).unwrap();
        let dense: u64 = 28 * s.modules.iter().map(|m| m.d_out * m.d_in).sum::<u64>();
        assert_eq!(flora.down_per_client, dense);
    }

    #[test]
    fn bad_targets_and_ranks_are_refused() {
        let s = llama_3b();
        let mut sp = spec(Method::FedSb, 32, &s);
        sp.targets = vec!["query".into()];
        assert!(Plan::new(&s, &sp).is_err());
        let sp = spec(Method::FedSb, 5000, &s);
        assert!(Plan::new(&s, &sp).unwrap_err().to_string().contains("exceeds"));
        let mut sp = spec(Method::FedExLora, 1 << 20, &s);
        sp.clients = 1 << 32;
        assert!(Plan::new(&s, &sp).unwrap_err().to_string().contains("overflow"));
        sp.clients = u64::MAX;
        assert!(Plan::new(&s, &sp).unwrap_err().to_string().contains("out of range"));
        let bad = serde_json::json!({"num_hidden_layers": 2, "hidden_size": 0, "intermediate_size": 4,
            "num_attention_heads": 1});
        assert!(ModelShape::from_config_json(&bad).unwrap_err().to_string().contains("hidden_size"));
        assert!("fedavg".parse::<Method>().is_err());
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), m.name(), "JSON and CLI names agree");
        }
    }
}
