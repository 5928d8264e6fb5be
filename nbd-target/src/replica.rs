//! The replication side of a volume's replica: who may ship to it (identity, size,
//! generation) and the order records are applied in. The bytes live in the replica store
//! ([`crate::store`]).
//!
//! Applying a batch appends its records, in order, to the store; committing makes them
//! durable, and only then are the batches acknowledged (several batches that arrive back to
//! back share one commit). Records the store already holds are skipped when a shipper sends
//! them again after a reconnection.

use std::sync::Arc;

use redun_shipper::proto::{self, Hello, RecordRef, RefuseCode};
use redun_store::segment::hex;
use redun_tracker::journal::format::{Kind, SyncInfo, SyncRole};

use crate::store::{Identity, ReplicaState, Store, StoreError};

/// Why the target refuses a shipper or a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: RefuseCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        match e.io_error() {
            Some(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                Refusal::new(RefuseCode::NoSpace, e.to_string())
            }
            Some(_) => Refusal::new(RefuseCode::Io, e.to_string()),
            None => Refusal::new(RefuseCode::InvalidState, e.to_string()),
        }
    }
}

/// A volume name is a file name on the target: the tracker's rule for names keeps separators
/// out.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    redun_tracker::config::check_name(name).map_err(|e| {
        Refusal::new(
            RefuseCode::InvalidName,
            format!("{e} (the target keeps NAME.img and NAME.state)"),
        )
    })
}

/// The replication side of a volume's store: checks who ships, and applies batches in order.
#[derive(Debug)]
pub struct Replica {
    store: Arc<Store>,
    /// Record bytes appended since the last commit.
    uncommitted: u64,
}

impl Replica {
    /// The identity a shipper's HELLO claims.
    pub fn identity(hello: &Hello) -> Identity {
        Identity {
            name: hello.name.clone(),
            uuid: hex(&hello.uuid),
            size: hello.size,
            generation: hello.generation,
        }
    }

    /// Refuses a source whose volume (uuid, size) is not the replica's.
    pub fn check_identity(st: &ReplicaState, hello: &Hello) -> Result<(), Refusal> {
        let uuid = hex(&hello.uuid);
        if st.uuid != uuid {
            return Err(Refusal::new(
                RefuseCode::IdentityMismatch,
                format!(
                    "replica {} belongs to volume uuid {}, the shipper sends uuid {uuid}: \
                     another volume of the same name",
                    hello.name, st.uuid
                ),
            ));
        }
        if st.size != hello.size {
            return Err(Refusal::new(
                RefuseCode::SizeMismatch,
                format!(
                    "replica {} has {} bytes, the volume has {}",
                    hello.name, st.size, hello.size
                ),
            ));
        }
        Ok(())
    }

    /// Takes `store` for the shipper that sent `hello`, or refuses a shipper whose volume is
    /// not this replica's.
    pub fn attach(store: Arc<Store>, hello: &Hello) -> Result<Replica, Refusal> {
        let st = store.state();
        Replica::check_identity(&st, hello)?;
        if st.generation != hello.generation {
            return Err(Refusal::new(
                RefuseCode::GenerationMismatch,
                format!(
                    "replica {} is at generation {}, the shipper at {}: {}",
                    hello.name,
                    st.generation,
                    hello.generation,
                    if hello.generation < st.generation {
                        "a stale primary may not write to it"
                    } else {
                        "the replica is older than this relationship"
                    }
                ),
            ));
        }
        // Whatever an earlier connection appended without committing is sent again.
        store.discard_uncommitted();
        Ok(Replica {
            store,
            uncommitted: 0,
        })
    }

    pub fn state(&self) -> ReplicaState {
        self.store.state()
    }

    /// Appends `records` (a batch, in order) to the store, not yet durably: see
    /// [`Replica::commit`]. Records before the replica's position were applied already and
    /// are skipped; a batch that starts after it would leave a hole and is refused.
    pub fn apply(&mut self, records: &[RecordRef<'_>]) -> Result<(), Refusal> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let next = self.store.applied();
        if next != 0 && first.seq > next {
            return Err(Refusal::new(
                RefuseCode::Gap,
                format!(
                    "replica {} needs seq {next} next but the batch starts at seq {}: the \
                     journal lost records, the replica needs a resync",
                    self.store.state().name,
                    first.seq
                ),
            ));
        }
        for r in records.iter().filter(|r| next == 0 || r.seq >= next) {
            self.apply_one(r)?;
            self.uncommitted += u64::from(r.length).max(1);
        }
        Ok(())
    }

    /// Record bytes applied and not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.uncommitted
    }

    /// Makes everything applied durable. Returns the last durable sequence number (0 when
    /// none).
    pub fn commit(&mut self) -> Result<u64, Refusal> {
        let through = self.store.commit()?;
        self.uncommitted = 0;
        Ok(through)
    }

    /// Checksums the blocks of `[offset, offset + length)` as of the last record applied
    /// (committed or not): what a HASH_REQUEST asks. Returns that record's sequence number.
    pub fn hashes(
        &mut self,
        offset: u64,
        length: u64,
        block: u32,
    ) -> Result<(u64, Vec<u128>), Refusal> {
        let size = self.store.size();
        if offset.checked_add(length).is_none_or(|e| e > size) {
            return Err(Refusal::new(
                RefuseCode::Protocol,
                format!("hash request {offset}+{length} beyond the volume's {size} bytes"),
            ));
        }
        let (as_of, view) = self.store.applied_view(offset, length)?;
        let hashes = view
            .hashes(offset, length, u64::from(block))
            .map_err(|e| Refusal::new(RefuseCode::Io, format!("cannot read the replica: {e}")))?;
        Ok((as_of, hashes))
    }

    /// A sync record: a begin, a slot with the blocks that differed (or none, when its
    /// shipper went away before filling it), or an end.
    fn apply_sync(&self, r: &RecordRef<'_>) -> Result<(), Refusal> {
        let malformed = |why: String| {
            Refusal::new(
                RefuseCode::Protocol,
                format!("sync record seq {}: {why}", r.seq),
            )
        };
        let info = SyncInfo::decode(r.payload)
            .ok_or_else(|| malformed("payload is not a sync record".into()))?;
        let blocks = if info.role == SyncRole::Slot {
            let end = r.offset + u64::from(r.length);
            proto::decode_slot(r.payload, r.offset, end).map_err(|e| malformed(e.to_string()))?
        } else {
            None
        };
        self.store
            .append_sync(r.seq, info, (r.offset, r.length), blocks.as_deref())
            .map_err(Refusal::from)
    }

    fn apply_one(&self, r: &RecordRef<'_>) -> Result<(), Refusal> {
        let size = self.store.size();
        let end = r.offset.checked_add(u64::from(r.length));
        if end.is_none_or(|e| e > size) {
            return Err(Refusal::new(
                RefuseCode::Protocol,
                format!(
                    "record seq {} covers {}+{} beyond the volume's {size} bytes",
                    r.seq, r.offset, r.length
                ),
            ));
        }
        let kind = match Kind::from_u8(r.kind) {
            Some(Kind::Write) => {
                if r.payload.len() != r.length as usize {
                    return Err(Refusal::new(
                        RefuseCode::Protocol,
                        format!("record seq {} has a payload of another length", r.seq),
                    ));
                }
                Kind::Write
            }
            Some(k @ (Kind::Trim | Kind::Zero)) => k,
            Some(k @ (Kind::Marker | Kind::Decision)) => k,
            Some(Kind::Sync) => return self.apply_sync(r),
            Some(Kind::Pad) | None => {
                return Err(Refusal::new(
                    RefuseCode::Protocol,
                    format!(
                        "record seq {} has kind {} which a batch may not carry",
                        r.seq, r.kind
                    ),
                ));
            }
        };
        let payload = if matches!(kind, Kind::Write | Kind::Marker | Kind::Decision) {
            r.payload
        } else {
            &[]
        };
        self.store
            .append(kind, r.seq, r.offset, r.length, payload)
            .map_err(Refusal::from)
    }
}
