//! The gRPC service: thin handlers that authenticate the caller, decode, call the [`Coordinator`] and map
//! its refusals to gRPC statuses. Only this module (and `main.rs`) sees tonic and prost types.
//!
//! **Invariant:** no handler blocks an async thread on the store or on an event being handled: the
//! coordinator calls that may (join, submit, leave, the init download's ledger row, the status document) run
//! under [`spawn_blocking`](tokio::task::spawn_blocking).
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedsb_common::comm::ledger::Direction;
use fedsb_common::wire::{CHUNK_SIZE, is_sha256_hex};
use fedsb_proto::v1 as pb;
use fedsb_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TlsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::{Coordinator, UploadSize, now_ms};
use crate::net::{ConnInfo, Counters};
use crate::round::{Poll, Reject, UpdateKey, UpdateMeta};

/// Metadata key carrying a client's identity in token mode (no client certificate).
pub const TOKEN_HEADER: &str = "x-fedsb-client";

/// gRPC framing per message: 1 byte compression flag + 4 bytes length.
const GRPC_FRAME: u64 = 5;

/// Largest gRPC message accepted (a chunk plus headroom).
pub const MAX_MESSAGE_BYTES: usize = 2 * CHUNK_SIZE + 64 * 1024;

/// The service object.
#[derive(Clone)]
pub struct Service {
    c: Arc<Coordinator>,
    /// A memory budget (KiB) for the updates being read, checked and aggregated at once, so the coordinator's
    /// memory does not grow with the number of clients uploading together: an upload waiting for its share
    /// holds only its HTTP/2 flow-control window.
    ingest: Arc<tokio::sync::Semaphore>,
}

/// The ingest budget: updates being read at once hold at most this many bytes (an update larger than the
/// budget takes all of it).
pub const INGEST_BUDGET_BYTES: u64 = 32 << 20;

/// Longest pause between two chunks of an update being read (it holds part of the ingest budget).
const CHUNK_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Service {
    /// A service for the run `c`.
    pub fn new(c: Arc<Coordinator>) -> Self {
        Self { c, ingest: Arc::new(tokio::sync::Semaphore::new((INGEST_BUDGET_BYTES >> 10) as usize)) }
    }

    /// The tonic server wrapper, with message limits set.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The caller's identity (certificate CN, else the token header) and its connection counters.
    /// The base folds of the rounds before `round`, as blob references.
    fn base_fold_refs(&self, round: u64) -> Vec<pb::BaseFold> {
        self.c
            .base_folds()
            .into_iter()
            .filter(|f| f.round < round)
            .map(|f| pb::BaseFold {
                round: f.round,
                product: self.c.blob(&f.product_sha256).map(|b| blob_ref(&f.product_sha256, b.bytes.len())),
                global: self.c.blob(&f.global_sha256).map(|b| blob_ref(&f.global_sha256, b.bytes.len())),
            })
            .collect()
    }

    fn identity<T>(&self, req: &Request<T>) -> Result<(String, Option<Arc<Counters>>), Status> {
        let (counters, certs) = if let Some(tls) = req.extensions().get::<TlsConnectInfo<ConnInfo>>() {
            (Some(tls.get_ref().counters.clone()), tls.peer_certs())
        } else {
            (req.extensions().get::<ConnInfo>().map(|c| c.counters.clone()), None)
        };
        let id = match certs.as_ref().and_then(|c| c.first().cloned()) {
            Some(der) => crate::certs::identity_from_der(der.as_ref())
                .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?,
            None => {
                let tok = req.metadata().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
                if tok.is_empty() {
                    return Err(Status::unauthenticated(format!(
                        "no client certificate and no `{TOKEN_HEADER}` token: present a certificate signed by the run's CA"
                    )));
                }
                if !tok.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || tok.len() > 128 {
                    return Err(Status::invalid_argument("client token must be [A-Za-z0-9._-]{1,128}"));
                }
                tok.to_string()
            }
        };
        if let Some(c) = &counters {
            self.c.register_connection(&id, c);
        }
        Ok((id, counters))
    }
}

/// The gRPC status for a refusal of the round engine.
pub fn reject_status(r: &Reject) -> Status {
    let msg = r.to_string();
    match r {
        Reject::UnknownRun(_) => Status::not_found(msg),
        Reject::UnknownClient(_) | Reject::NotSampled(_) => Status::permission_denied(msg),
        Reject::StaleRound { .. } | Reject::Finished => Status::failed_precondition(msg),
        Reject::WrongTask(_) | Reject::Invalid(_) => Status::invalid_argument(msg),
        Reject::Duplicate(_) => Status::already_exists(msg),
        Reject::DeadlinePassed => Status::deadline_exceeded(msg),
    }
}

/// Runs `f` on a blocking thread (store calls, aggregation, decoding), its panic an internal error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))
}

fn blob_ref(sha: &str, size: usize) -> pb::BlobRef {
    pb::BlobRef { sha256: sha.to_string(), size: size as u64 }
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let (id, _) = self.identity(&req)?;
        let r = req.into_inner();
        if r.base_model_sha256 != self.c.spec.base_model_sha256 {
            return Err(Status::failed_precondition(format!(
                "this client's base model weights have sha256 {}, but the run fine-tunes weights with sha256 {}: \
                 use the same base model file",
                r.base_model_sha256, self.c.spec.base_model_sha256
            )));
        }
        if let Some(dp) = &self.c.spec.dp {
            dp.check_delta(r.num_examples).map_err(|e| {
                Status::failed_precondition(format!("this run requires DP-SGD and cannot take this client: {e}"))
            })?;
        }
        let (c, client, n) = (self.c.clone(), id.clone(), r.num_examples);
        blocking(move || c.join(&client, n)).await?;
        tracing::info!("client {id} joined ({} examples, version {})", r.num_examples, r.client_version);
        self.c.notify.notify_waiters();
        let init = self.c.blob(&self.c.init_sha256).ok_or_else(|| Status::internal("the init blob is missing"))?;
        Ok(Response::new(pb::JoinReply {
            run_id: self.c.run_id.clone(),
            client_id: id,
            run_spec_json: self.c.spec_json.clone(),
            init_blob: Some(blob_ref(&self.c.init_sha256, init.bytes.len())),
        }))
    }

    async fn get_task(&self, req: Request<pb::GetTaskRequest>) -> Result<Response<pb::GetTaskReply>, Status> {
        let (id, _) = self.identity(&req)?;
        let r = req.into_inner();
        if r.run_id != self.c.run_id {
            return Err(reject_status(&Reject::UnknownRun(r.run_id)));
        }
        let until = Instant::now() + Duration::from_millis(r.wait_ms.min(30_000) as u64);
        loop {
            let notified = self.c.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let poll = self.c.engine().poll(&id, now_ms()).map_err(|e| reject_status(&e))?;
            let reply = match poll {
                Poll::Task(t) => pb::get_task_reply::Reply::Task(pb::Task {
                    run_id: self.c.run_id.clone(),
                    round: t.round,
                    task_id: t.task_id,
                    global: self.c.blob(&t.global_sha256).map(|b| blob_ref(&t.global_sha256, b.bytes.len())),
                    deadline_unix_ms: t.deadline_ms,
                    base_folds: self.base_fold_refs(t.round),
                }),
                Poll::Finished(o) => pb::get_task_reply::Reply::Finished(pb::Finished {
                    status: o.status,
                    message: o.message,
                    global: self.c.blob(&o.global_sha256).map(|b| blob_ref(&o.global_sha256, b.bytes.len())),
                    base_folds: self.base_fold_refs(u64::MAX),
                }),
                Poll::Wait(reason) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if !left.is_zero() {
                        tokio::select! {
                            _ = &mut notified => {}
                            _ = tokio::time::sleep(left.min(Duration::from_millis(1000))) => {}
                        }
                        continue;
                    }
                    pb::get_task_reply::Reply::Wait(pb::Wait { retry_after_ms: 200, reason })
                }
            };
            let msg = pb::GetTaskReply { reply: Some(reply) };
            if let Some(pb::get_task_reply::Reply::Task(t)) = &msg.reply {
                self.c.record_round_traffic(t.round, &id, Direction::Down, 0, msg.encoded_len() as u64 + GRPC_FRAME);
            }
            return Ok(Response::new(msg));
        }
    }

    type FetchBlobStream = ReceiverStream<Result<pb::BlobChunk, Status>>;

    async fn fetch_blob(&self, req: Request<pb::FetchBlobRequest>) -> Result<Response<Self::FetchBlobStream>, Status> {
        let (id, counters) = self.identity(&req)?;
        let r = req.into_inner();
        if !is_sha256_hex(&r.sha256) {
            return Err(Status::invalid_argument("sha256 must be 64 lowercase hex characters"));
        }
        let blob = self.c.blob(&r.sha256).ok_or_else(|| Status::not_found(format!("no blob {}", r.sha256)))?;
        let total = blob.bytes.len() as u64;
        if r.offset > total {
            return Err(Status::out_of_range(format!("offset {} beyond the blob's {total} bytes", r.offset)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let c = self.c.clone();
        let wire0 = counters.as_ref().map(|k| k.written() + k.read());
        tokio::spawn(async move {
            let mut offset = r.offset;
            let mut message = 0u64;
            while offset < total {
                let end = (offset + CHUNK_SIZE as u64).min(total);
                let chunk = pb::BlobChunk { offset, total, data: blob.bytes.slice(offset as usize..end as usize) };
                message += chunk.encoded_len() as u64 + GRPC_FRAME;
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the client went away; nothing to count as delivered
                }
                offset = end;
            }
            let sent = total - r.offset;
            let payload = (blob.payload_bytes as u128 * sent as u128 / total.max(1) as u128) as u64;
            if r.sha256 == c.init_sha256 {
                // Let the last frames reach the socket before reading the counters.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let wire = match (&counters, wire0) {
                    (Some(k), Some(w0)) => Some(k.written() + k.read() - w0),
                    _ => None,
                };
                let _ = tokio::task::spawn_blocking(move || c.record_init_download(&id, payload, message, wire)).await;
            } else {
                c.record_global_download(&id, &r.sha256, payload, message);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let (id, _) = self.identity(&req)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty update stream"))?;
        let mut message = first.encoded_len() as u64 + GRPC_FRAME;
        let Some(pb::update_chunk::Part::Header(h)) = first.part else {
            return Err(Status::invalid_argument("the first message of an update must be its header"));
        };
        let blob = h.blob.clone().ok_or_else(|| Status::invalid_argument("the update header lacks its blob"))?;
        // Cheap checks before reading any tensor bytes.
        let key = UpdateKey { run_id: &h.run_id, round: h.round, task_id: &h.task_id };
        self.c.engine().check_submit(&id, key, now_ms()).map_err(|e| reject_status(&e))?;
        if blob.size > self.c.opts.max_update_bytes {
            return Err(Status::resource_exhausted(format!(
                "update of {} bytes exceeds the limit of {} bytes",
                blob.size, self.c.opts.max_update_bytes
            )));
        }
        let expected = self.c.expected_frozen_sha256(h.round);
        if h.frozen_sha256 != expected {
            return Err(Status::failed_precondition(format!(
                "the update was trained with frozen adapter tensors (B, A) and base folds of sha256 {}, the run's \
                 are {expected}: the client must use the run's init blob and fold every round's product",
                h.frozen_sha256
            )));
        }
        self.check_dp(&h)?;
        let share = (blob.size.div_ceil(1024)).clamp(1, INGEST_BUDGET_BYTES >> 10) as u32;
        let _permit =
            self.ingest.acquire_many(share).await.map_err(|_| Status::unavailable("the coordinator is stopping"))?;
        let mut bytes = Vec::with_capacity(blob.size as usize);
        // Hashed as the chunks arrive, while they are in cache.
        let mut hasher = Sha256::new();
        loop {
            let next = tokio::time::timeout(CHUNK_IDLE_TIMEOUT, stream.message()).await.map_err(|_| {
                Status::deadline_exceeded(format!("no update data for {}s", CHUNK_IDLE_TIMEOUT.as_secs()))
            })?;
            let Some(m) = next? else { break };
            message += m.encoded_len() as u64 + GRPC_FRAME;
            match m.part {
                Some(pb::update_chunk::Part::Data(d)) => {
                    if bytes.len() + d.len() > blob.size as usize {
                        return Err(Status::invalid_argument(format!("more bytes than the declared {}", blob.size)));
                    }
                    hasher.update(&d);
                    bytes.extend_from_slice(&d);
                }
                _ => return Err(Status::invalid_argument("only data may follow the header")),
            }
        }
        if bytes.len() as u64 != blob.size {
            return Err(Status::invalid_argument(format!(
                "got {} bytes, the header declared {}",
                bytes.len(),
                blob.size
            )));
        }
        if hex::encode(hasher.finalize()) != blob.sha256 {
            return Err(Status::data_loss("the update's bytes do not match its sha256"));
        }
        let payload = safetensors_payload(&bytes).map_err(Status::invalid_argument)?;
        let update = blocking(move || crate::coordinator::tensors_of(&bytes))
            .await?
            .map_err(|e| Status::invalid_argument(format!("invalid update: {e}")))?;
        let meta = UpdateMeta {
            num_examples: h.num_examples,
            steps: h.steps,
            train_loss: h.train_loss,
            dp: h.dp.as_ref().map(dp_report_from_pb),
        };
        if !meta.train_loss.is_finite() {
            return Err(Status::invalid_argument("train_loss is not finite"));
        }
        let size = UploadSize { blob: blob.size, payload, message };
        let c = self.c.clone();
        blocking(move || {
            let key = UpdateKey { run_id: &h.run_id, round: h.round, task_id: &h.task_id };
            c.submit(&id, key, &update, meta, size)
        })
        .await?
        .map_err(|e| reject_status(&e))?;
        Ok(Response::new(pb::SubmitReply { accepted: true, message: "accepted".into() }))
    }

    async fn get_status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let c = self.c.clone();
        let json = blocking(move || c.status_json()).await?.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::StatusReply { json }))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveReply>, Status> {
        let (id, _) = self.identity(&req)?;
        let r = req.into_inner();
        if r.run_id != self.c.run_id {
            return Err(reject_status(&Reject::UnknownRun(r.run_id)));
        }
        let reason: String = r.reason.chars().take(500).collect();
        let (c, client) = (self.c.clone(), id.clone());
        blocking(move || c.leave(&client, &reason)).await?.map_err(|e| reject_status(&e))?;
        Ok(Response::new(pb::LeaveReply { message: format!("client {id} has left run {}", self.c.run_id) }))
    }
}

/// A DP report off the wire.
fn dp_report_from_pb(d: &pb::DpReport) -> fedsb_common::dp::DpReport {
    fedsb_common::dp::DpReport {
        epsilon: d.epsilon,
        delta: d.delta,
        best_order: d.best_order,
        steps: d.steps,
        noise_multiplier: d.noise_multiplier,
        sample_rate: d.sample_rate,
        max_grad_norm: d.max_grad_norm,
        secure_noise: d.secure_noise,
    }
}

impl Service {
    /// With DP required: the update must carry a DP report that matches the run's spec and budget (ε recomputed
    /// here); without, a report is recorded as sent.
    fn check_dp(&self, h: &pb::UpdateHeader) -> Result<(), Status> {
        let Some(spec) = &self.c.spec.dp else { return Ok(()) };
        let Some(d) = &h.dp else {
            return Err(Status::failed_precondition(
                "this run requires DP-SGD (the [dp] section of its config) and the update carries no DP report: \
                 the client must train with DP-SGD (a fedsb-client that reads the run spec does so)",
            ));
        };
        let expected_batch = self.c.spec.local.batch_size * self.c.spec.local.grad_accum;
        dp_report_from_pb(d)
            .verify(spec, h.num_examples, expected_batch, h.steps as u64)
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }
}

/// Tensor bytes of a safetensors blob (its size minus the 8-byte length and the JSON header).
pub fn safetensors_payload(bytes: &[u8]) -> Result<u64, String> {
    let n: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("not a safetensors blob")?;
    let header = u64::from_le_bytes(n);
    (bytes.len() as u64).checked_sub(8 + header).ok_or_else(|| "safetensors header longer than the blob".to_string())
}
