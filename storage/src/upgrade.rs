//! Conversions of what older format versions wrote, in one place (see
//! [`crate::codec`] for the versions). Each value that can hold a key and
//! its value converts itself when it is decoded from an older version: log
//! entries (from the log, or in AppendEntries from an older leader), and
//! snapshot records.
//!
//! From 1 to 2: registry instance values become JSON
//! ([`crate::registry::upgrade_v1`]).

use openraft::raft::AppendEntriesRequest;
use openraft::{Entry, EntryPayload};

use crate::codec::Upgrade;
use crate::command::{Command, Op};
use crate::kv::TxnOp;
use crate::snapshot::Record;
use crate::TypeConfig;

fn value(from: u8, key: &str, value: &mut Vec<u8>) {
    if from < 2 {
        crate::registry::upgrade_v1(key, value);
    }
}

impl Upgrade for TxnOp {
    fn upgrade(&mut self, from: u8) {
        match self {
            TxnOp::Put { key, value: v } | TxnOp::PutLeased { key, value: v, .. } => value(from, key, v),
            TxnOp::Delete { .. } => {}
        }
    }
}

impl Upgrade for Command {
    fn upgrade(&mut self, from: u8) {
        match &mut self.op {
            Op::Put { key, value: v } | Op::PutLeased { key, value: v, .. } | Op::GraySet { key, value: v, .. } => {
                value(from, key, v)
            }
            Op::Txn(txn) => txn.success.iter_mut().chain(txn.failure.iter_mut()).for_each(|op| op.upgrade(from)),
            Op::Batch(commands) => commands.iter_mut().for_each(|c| c.upgrade(from)),
            Op::Delete { .. }
            | Op::RegisterWorker(_)
            | Op::CreateJob(_)
            | Op::JobEvents(_)
            | Op::LeaseGrant { .. }
            | Op::LeaseRevoke { .. }
            | Op::GrayPromote { .. }
            | Op::GrayDrop { .. }
            | Op::ProbeDefine(_)
            | Op::ProbeDelete { .. }
            | Op::ProbeReport { .. }
            | Op::ForgetJobs { .. } => {}
        }
    }
}

impl Upgrade for Entry<TypeConfig> {
    fn upgrade(&mut self, from: u8) {
        if let EntryPayload::Normal(cmd) = &mut self.payload {
            cmd.upgrade(from);
        }
    }
}

impl Upgrade for AppendEntriesRequest<TypeConfig> {
    fn upgrade(&mut self, from: u8) {
        self.entries.iter_mut().for_each(|e| e.upgrade(from));
    }
}

impl Upgrade for Record {
    fn upgrade(&mut self, from: u8) {
        match self {
            Record::Kv { key, value: stored } => value(from, key, &mut stored.value),
            Record::Change { change, .. } => {
                let key = change.event.kv.key.clone();
                value(from, &key, &mut change.event.kv.value);
                if let Some(prev) = &mut change.prev {
                    value(from, &key, &mut prev.value);
                }
            }
            Record::Gray { key, variants } => variants.iter_mut().for_each(|v| value(from, key, &mut v.value)),
            Record::Dedup { .. }
            | Record::End { .. }
            | Record::Worker(_)
            | Record::Job(_)
            | Record::OldEvent
            | Record::Lease(_)
            | Record::OldBase
            | Record::ProbeDef(_)
            | Record::ProbeResults { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;
    use crate::codec;
    use crate::kv::Txn;
    use crate::registry::{encode_v1, Instance};

    fn instance() -> Instance {
        Instance { service: "web".into(), id: "w1".into(), address: "10.0.0.1".into(), port: 80, ..Default::default() }
    }

    /// A log entry as format `version` would have written it: today's
    /// framing (unchanged since 1) with that version byte.
    fn entry_bytes(version: u8, value: Vec<u8>) -> Vec<u8> {
        let txn = Txn {
            compares: vec![],
            success: vec![
                TxnOp::Put { key: "registry/web/w1".into(), value: value.clone() },
                TxnOp::Delete { key: "registry/web/w1".into() },
            ],
            failure: vec![],
        };
        let batch = Op::Batch(vec![
            Command { request_id: "a".into(), op: Op::PutLeased { key: "registry/web/w1".into(), value, lease: 7 } },
            Command { request_id: "b".into(), op: Op::Txn(Box::new(txn)) },
        ]);
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 5),
            payload: EntryPayload::Normal(Command { request_id: String::new(), op: batch }),
        };
        let mut bytes = codec::encode("log entry", &entry).unwrap();
        bytes[0] = version;
        bytes
    }

    fn values(entry: &Entry<TypeConfig>) -> Vec<Vec<u8>> {
        let EntryPayload::Normal(Command { op: Op::Batch(cmds), .. }) = &entry.payload else { panic!("a batch") };
        let mut out = Vec::new();
        for c in cmds {
            match &c.op {
                Op::PutLeased { value, .. } => out.push(value.clone()),
                Op::Txn(t) => {
                    for op in &t.success {
                        if let TxnOp::Put { value, .. } = op {
                            out.push(value.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    #[test]
    fn a_format_1_entry_reads_back_with_json_instances_and_a_format_2_one_as_written() {
        let old: Entry<TypeConfig> =
            codec::decode_upgraded("log entry", &entry_bytes(1, encode_v1(&instance()))).unwrap();
        let json = instance().encode();
        assert_eq!(values(&old), vec![json.clone(), json.clone()], "every instance value nested in the batch");
        // Format 2 bytes are never converted, whatever they hold.
        let new: Entry<TypeConfig> =
            codec::decode_upgraded("log entry", &entry_bytes(2, encode_v1(&instance()))).unwrap();
        assert_eq!(values(&new), vec![encode_v1(&instance()), encode_v1(&instance())]);
    }
}
