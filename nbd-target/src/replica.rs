//! A volume's replica on the target: `DATA_DIR/NAME.img` (the volume's bytes, created sparse
//! with the volume's size on first contact) and `DATA_DIR/NAME.state` (identity, generation
//! and the first sequence number not yet applied), replaced atomically.
//!
//! Applying a batch writes its records in order; committing syncs the image, then records the
//! new position durably: only then are the batches acknowledged (several batches that arrive
//! back to back share one commit). A crash between the two re-applies
//! records already applied when the batch comes again, which leaves the same bytes, since
//! the stream is replayed in order from that position (every record overwrites its range).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use redun_shipper::proto::{Hello, RecordRef, RefuseCode};
use redun_tracker::journal::format::Kind;
use serde::{Deserialize, Serialize};

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

    fn io(what: &str, path: &Path, e: &io::Error) -> Refusal {
        let code = if e.raw_os_error() == Some(libc::ENOSPC) {
            RefuseCode::NoSpace
        } else {
            RefuseCode::Io
        };
        Refusal::new(code, format!("{what} {}: {e}", path.display()))
    }
}

/// What `NAME.state` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub name: String,
    /// The volume's uuid, hex.
    pub uuid: String,
    pub size: u64,
    pub generation: u64,
    /// The first sequence number not applied (0 until the first batch).
    pub next_seq: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

#[derive(Debug)]
pub struct Replica {
    img: File,
    img_path: PathBuf,
    state_path: PathBuf,
    /// What is durable.
    state: ReplicaState,
    /// The first sequence number not yet written to the image (durable or not).
    applied: u64,
    /// Record bytes written since the last commit.
    uncommitted: u64,
}

impl Replica {
    /// Opens the replica named in `hello`, or creates it; refuses a shipper whose volume is
    /// not this replica's.
    pub fn open_or_create(dir: &Path, hello: &Hello) -> Result<Replica, Refusal> {
        check_name(&hello.name)?;
        let img_path = dir.join(format!("{}.img", hello.name));
        let state_path = dir.join(format!("{}.state", hello.name));
        let uuid = hex(&hello.uuid);
        let state = if state_path.exists() {
            let text = std::fs::read_to_string(&state_path)
                .map_err(|e| Refusal::io("cannot read", &state_path, &e))?;
            let st: ReplicaState = serde_json::from_str(&text).map_err(|e| {
                Refusal::new(
                    RefuseCode::InvalidState,
                    format!(
                        "replica state {} is damaged ({e}): move the replica away to start over",
                        state_path.display()
                    ),
                )
            })?;
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
            st
        } else {
            ReplicaState {
                name: hello.name.clone(),
                uuid,
                size: hello.size,
                generation: hello.generation,
                next_seq: 0,
            }
        };
        let img = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&img_path)
            .map_err(|e| Refusal::io("cannot open", &img_path, &e))?;
        let len = img
            .metadata()
            .map_err(|e| Refusal::io("cannot stat", &img_path, &e))?
            .len();
        if len != hello.size {
            if len != 0 && state_path.exists() {
                return Err(Refusal::new(
                    RefuseCode::InvalidState,
                    format!(
                        "replica image {} has {len} bytes, its state says {}",
                        img_path.display(),
                        hello.size
                    ),
                ));
            }
            img.set_len(hello.size)
                .map_err(|e| Refusal::io("cannot size", &img_path, &e))?;
        }
        let r = Replica {
            img,
            img_path,
            state_path,
            applied: state.next_seq,
            state,
            uncommitted: 0,
        };
        if !r.state_path.exists() {
            r.img
                .sync_all()
                .map_err(|e| Refusal::io("cannot sync", &r.img_path, &e))?;
            r.save()?;
        }
        Ok(r)
    }

    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// Writes the state file atomically and durably.
    fn save(&self) -> Result<(), Refusal> {
        let tmp = self.state_path.with_extension("state.tmp");
        let text = serde_json::to_string_pretty(&self.state).expect("serializable");
        let r = (|| {
            let f = File::create(&tmp)?;
            f.write_all_at(text.as_bytes(), 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.state_path)?;
            if let Some(d) = self.state_path.parent() {
                File::open(d)?.sync_all()?;
            }
            Ok::<(), io::Error>(())
        })();
        r.map_err(|e| Refusal::io("cannot write", &self.state_path, &e))
    }

    /// Applies `records` (a batch, in order) to the image, not yet durably: see
    /// [`Replica::commit`]. Records before the replica's position were applied already and
    /// are skipped; a batch that starts after it would leave a hole and is refused.
    pub fn apply(&mut self, records: &[RecordRef<'_>]) -> Result<(), Refusal> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let next = self.applied;
        if next != 0 && first.seq > next {
            return Err(Refusal::new(
                RefuseCode::Gap,
                format!(
                    "replica {} needs seq {next} next but the batch starts at seq {}: the \
                     journal lost records, the replica needs a resync",
                    self.state.name, first.seq
                ),
            ));
        }
        for r in records.iter().filter(|r| next == 0 || r.seq >= next) {
            self.apply_one(r)?;
            self.applied = r.seq + 1;
            self.uncommitted += u64::from(r.length).max(1);
        }
        Ok(())
    }

    /// Record bytes applied and not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.uncommitted
    }

    /// Makes everything applied durable: the image first, then the state that says so.
    /// Returns the last durable sequence number (0 when none).
    pub fn commit(&mut self) -> Result<u64, Refusal> {
        if self.applied != self.state.next_seq {
            self.img
                .sync_data()
                .map_err(|e| Refusal::io("cannot sync", &self.img_path, &e))?;
            let before = self.state.next_seq;
            self.state.next_seq = self.applied;
            if let Err(r) = self.save() {
                self.state.next_seq = before;
                return Err(r);
            }
        }
        self.uncommitted = 0;
        Ok(self.state.next_seq.saturating_sub(1))
    }

    fn apply_one(&self, r: &RecordRef<'_>) -> Result<(), Refusal> {
        let end = r.offset.checked_add(u64::from(r.length));
        if end.is_none_or(|e| e > self.state.size) {
            return Err(Refusal::new(
                RefuseCode::Protocol,
                format!(
                    "record seq {} covers {}+{} beyond the volume's {} bytes",
                    r.seq, r.offset, r.length, self.state.size
                ),
            ));
        }
        let io = |e: io::Error| Refusal::io("cannot write", &self.img_path, &e);
        match Kind::from_u8(r.kind) {
            Some(Kind::Write) => {
                if r.payload.len() != r.length as usize {
                    return Err(Refusal::new(
                        RefuseCode::Protocol,
                        format!("record seq {} has a payload of another length", r.seq),
                    ));
                }
                self.img.write_all_at(r.payload, r.offset).map_err(io)
            }
            Some(Kind::Trim | Kind::Zero) => {
                // Trimmed ranges read as zeros on the replica: punch a hole.
                let len = i64::from(r.length);
                let off = i64::try_from(r.offset).unwrap_or(i64::MAX);
                let punched = nix::fcntl::fallocate(
                    &self.img,
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                );
                if punched.is_ok() {
                    return Ok(());
                }
                let zeros = vec![0u8; r.length as usize];
                self.img.write_all_at(&zeros, r.offset).map_err(io)
            }
            // Consistency points become recovery points with the replica store.
            Some(Kind::Marker) => Ok(()),
            Some(Kind::Pad) | None => Err(Refusal::new(
                RefuseCode::Protocol,
                format!(
                    "record seq {} has kind {} which a batch may not carry",
                    r.seq, r.kind
                ),
            )),
        }
    }
}
