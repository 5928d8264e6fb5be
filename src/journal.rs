//! `redun journal dump | check | replay`: the journal inspection tools.

use std::fs::{File, OpenOptions};
use std::process::ExitCode;

use anyhow::Context;
use redun_tracker::journal::inspect::{Inspection, find_damage, inspect};
use redun_tracker::journal::{Scanner, read_superblock};
use redun_tracker::track::wal::apply_records;

use crate::JournalCommand;

fn open(path: &std::path::Path) -> anyhow::Result<(File, Inspection)> {
    let f = File::open(path).with_context(|| format!("cannot open journal {}", path.display()))?;
    let i = inspect(&f).with_context(|| format!("journal {}", path.display()))?;
    Ok((f, i))
}

pub fn run(cmd: JournalCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JournalCommand::Dump { file, json } => {
            let (_, i) = open(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
                return Ok(ExitCode::SUCCESS);
            }
            summary(&i);
            println!(
                "{:>10} {:<6} {:>14} {:>10} {:>10} {:>5} {:>5} {:>12}",
                "SEQ", "KIND", "OFFSET", "LENGTH", "PAYLOAD", "LAP", "EPOCH", "FILE-OFFSET"
            );
            for r in &i.records {
                println!(
                    "{:>10} {:<6} {:>14} {:>10} {:>10} {:>5} {:>5} {:>12}",
                    r.seq, r.kind, r.offset, r.length, r.payload_len, r.lap, r.epoch, r.file_offset
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Check { file, json } => {
            let (f, i) = open(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                summary(&i);
                if i.healthy() {
                    println!("ok: {} records, no damage", i.records.len());
                } else {
                    println!(
                        "DAMAGE: record seq {} at file offset {}: {}",
                        i.end_seq, i.end_file_offset, i.end_reason
                    );
                    for o in &i.orphans {
                        println!(
                            "  valid record seq {} at file offset {} lies beyond it",
                            o.seq, o.file_offset
                        );
                    }
                    let damage =
                        find_damage(&f).with_context(|| format!("journal {}", file.display()))?;
                    match damage.map(|d| (d.lost_records, d.ranges)) {
                        Some((lost, Some(ranges))) => println!(
                            "  {lost} records lost; at its next start the tracker marks the {} \
                             volume ranges they changed ({} bytes) dirty",
                            ranges.len(),
                            ranges.iter().map(|r| r.1).sum::<u64>()
                        ),
                        Some((lost, None)) => println!(
                            "  {lost} records lost, not all of them readable: at its next start \
                             the tracker marks the whole volume dirty"
                        ),
                        None => println!(
                            "  a torn record at the head of a journal that was not closed: what \
                             a crash leaves, covered by the region map"
                        ),
                    }
                }
            }
            Ok(if i.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        JournalCommand::Replay { base, journal, out } => {
            let jf = File::open(&journal)
                .with_context(|| format!("cannot open journal {}", journal.display()))?;
            std::fs::copy(&base, &out)
                .with_context(|| format!("cannot copy {} to {}", base.display(), out.display()))?;
            let img = OpenOptions::new()
                .write(true)
                .open(&out)
                .with_context(|| format!("cannot open {}", out.display()))?;
            let sb = read_superblock(&jf)?;
            let mut scan = Scanner::new(&jf, &sb, sb.tail_pos, sb.tail_seq);
            // The tracker's own replay, onto the copy.
            let n = apply_records(&mut scan, 0, &img)?;
            img.sync_all()?;
            let end = scan.end().cloned();
            println!(
                "replayed {n} changes (through seq {}) onto {}{}",
                scan.position().1 - 1,
                out.display(),
                end.filter(|e| !e.is_clean())
                    .map(|e| format!(
                        "; the chain ends at file offset {} seq {}: {}",
                        e.file_offset, e.seq, e.why
                    ))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn summary(i: &Inspection) {
    println!(
        "journal: capacity={} used={} tail_seq={} next_seq={} epoch={} clean={} volume_size={} uuid={}",
        i.capacity,
        i.used_bytes,
        i.tail_seq,
        i.next_seq,
        i.epoch,
        i.clean,
        i.volume_size,
        i.volume_uuid
    );
    println!(
        "chain end: file offset {} seq {}: {}",
        i.end_file_offset, i.end_seq, i.end_reason
    );
}
