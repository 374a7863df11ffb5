//! Service registry instances as the replicated state stores them: the
//! value of key `registry/<service>/<id>`, a JSON object (so that
//! `ferry config get registry/web/w1` and config watches show something a
//! person can read), bound to a lease like any key.
//!
//! Data format: encoding format 1 (see [`crate::codec`]) stored these
//! values as protobuf `ferry.v1.Instance` messages, a wire type. Values
//! read from format 1 log entries and snapshots are converted to JSON as
//! they are decoded ([`upgrade_v1`]), so a node started on an older data
//! directory, or receiving entries from an older leader, holds the same
//! state as every other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where instances live in the key space.
pub const PREFIX: &str = "registry/";

/// One instance of a service (a provider, or a consumer registered so
/// operators see who uses the service).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Instance {
    /// The service.
    pub service: String,
    /// Unique within the service.
    pub id: String,
    /// Host name or IP address clients reach it at.
    pub address: String,
    /// Port clients reach it at.
    pub port: u32,
    /// The instance's version.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Methods it serves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Relative share of traffic.
    pub weight: u32,
    /// Only gray (canary) traffic should go here.
    #[serde(skip_serializing_if = "is_false")]
    pub gray: bool,
    /// Labels for routing.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// A consumer of the service, not a provider.
    #[serde(skip_serializing_if = "is_false")]
    pub consumer: bool,
    /// Set by the cluster: the lease ran out in a mass expiry that tripped
    /// the protect threshold, so the instance is kept, flagged.
    #[serde(skip_serializing_if = "is_false")]
    pub suspect: bool,
    /// Set by the cluster only in the value written just before an explicit
    /// deregistration deletes the key (one log entry), so the history tells
    /// it from a lease that ended.
    #[serde(skip_serializing_if = "is_false")]
    pub deregistered: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Instance {
    /// The key this instance is stored under.
    pub fn key(&self) -> String {
        key(&self.service, &self.id)
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and string maps always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored value; `None` if it is not an instance (a key written
    /// under the prefix by hand).
    pub fn decode(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }
}

/// The key of instance `id` of `service`.
pub fn key(service: &str, id: &str) -> String {
    format!("{PREFIX}{service}/{id}")
}

/// The key prefix of a service's instances.
pub fn prefix(service: &str) -> String {
    format!("{PREFIX}{service}/")
}

/// The service of an instance key (`registry/<service>/<id>`).
pub fn service_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (service, id) = rest.split_once('/')?;
    (!service.is_empty() && !id.is_empty()).then_some(service)
}

/// Converts the value of `key`, as encoding format 1 stored it, to today's
/// form: an instance key's protobuf value becomes JSON. Any other key, or a
/// value that is not a format 1 instance, is left as it is. Deterministic,
/// so every node converts the same entries to the same bytes.
pub fn upgrade_v1(key: &str, value: &mut Vec<u8>) {
    if service_of(key).is_none() {
        return;
    }
    if let Some(instance) = v1::decode(value) {
        *value = instance.encode();
    }
}

#[cfg(test)]
pub(crate) use v1::encode as encode_v1;

/// The format 1 encoding, frozen here: protobuf `ferry.v1.Instance` as it
/// was when the replicated state stored it (fields 1 to 13).
mod v1 {
    use std::collections::{BTreeMap, HashMap};

    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    struct Instance {
        #[prost(string, tag = "1")]
        service: String,
        #[prost(string, tag = "2")]
        id: String,
        #[prost(string, tag = "3")]
        address: String,
        #[prost(uint32, tag = "4")]
        port: u32,
        #[prost(string, tag = "5")]
        version: String,
        #[prost(string, repeated, tag = "6")]
        methods: Vec<String>,
        #[prost(uint32, tag = "7")]
        weight: u32,
        #[prost(bool, tag = "8")]
        gray: bool,
        #[prost(map = "string, string", tag = "9")]
        labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "10")]
        metadata: HashMap<String, String>,
        #[prost(bool, tag = "11")]
        consumer: bool,
        #[prost(bool, tag = "12")]
        suspect: bool,
        #[prost(bool, tag = "13")]
        deregistered: bool,
    }

    /// A format 1 instance value; `None` if the bytes are not one (then
    /// they were not written by the registry, and stay as they are).
    pub(super) fn decode(value: &[u8]) -> Option<super::Instance> {
        // JSON (what a person may have put there) is never taken for protobuf.
        if value.first().is_some_and(|b| *b == b'{') {
            return None;
        }
        let i = Instance::decode(value).ok()?;
        if i.service.is_empty() || i.id.is_empty() {
            return None;
        }
        let sorted = |m: HashMap<String, String>| m.into_iter().collect::<BTreeMap<_, _>>();
        Some(super::Instance {
            service: i.service,
            id: i.id,
            address: i.address,
            port: i.port,
            version: i.version,
            methods: i.methods,
            weight: i.weight,
            gray: i.gray,
            labels: sorted(i.labels),
            metadata: sorted(i.metadata),
            consumer: i.consumer,
            suspect: i.suspect,
            deregistered: i.deregistered,
        })
    }

    /// The format 1 bytes of `i` (for tests of the conversion).
    #[cfg(test)]
    pub(crate) fn encode(i: &super::Instance) -> Vec<u8> {
        Instance {
            service: i.service.clone(),
            id: i.id.clone(),
            address: i.address.clone(),
            port: i.port,
            version: i.version.clone(),
            methods: i.methods.clone(),
            weight: i.weight,
            gray: i.gray,
            labels: i.labels.clone().into_iter().collect(),
            metadata: i.metadata.clone().into_iter().collect(),
            consumer: i.consumer,
            suspect: i.suspect,
            deregistered: i.deregistered,
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Instance {
        Instance {
            service: "web".into(),
            id: "w1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            version: "v1".into(),
            weight: 100,
            labels: [("zone".to_string(), "a".to_string())].into(),
            metadata: [("team".to_string(), "edge".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn instances_are_stored_as_readable_json_and_read_back() {
        let i = web();
        let text = String::from_utf8(i.encode()).unwrap();
        assert_eq!(
            text,
            r#"{"service":"web","id":"w1","address":"10.0.0.1","port":80,"version":"v1","weight":100,"labels":{"zone":"a"},"metadata":{"team":"edge"}}"#
        );
        assert_eq!(Instance::decode(text.as_bytes()).as_ref(), Some(&i));
        assert_eq!(Instance::decode(b"not an instance"), None);
        assert_eq!(i.key(), "registry/web/w1");
        assert_eq!(service_of("registry/web/w1"), Some("web"));
        for not_instance in ["registry/web/", "registry//w1", "registry/web", "app/x"] {
            assert_eq!(service_of(not_instance), None, "{not_instance}");
        }
    }

    #[test]
    fn format_1_protobuf_values_become_json_and_nothing_else_changes() {
        let mut old = web();
        old.deregistered = true;
        let mut value = v1::encode(&old);
        upgrade_v1("registry/web/w1", &mut value);
        assert_eq!(Instance::decode(&value), Some(old.clone()));
        // Already JSON, another key, or bytes of someone else's: untouched.
        let json = old.encode();
        let mut same = json.clone();
        upgrade_v1("registry/web/w1", &mut same);
        assert_eq!(same, json);
        let mut elsewhere = v1::encode(&old);
        upgrade_v1("app/w1", &mut elsewhere);
        assert_eq!(elsewhere, v1::encode(&old));
        let mut junk = b"\xff\xfe junk".to_vec();
        upgrade_v1("registry/web/w1", &mut junk);
        assert_eq!(junk, b"\xff\xfe junk");
    }
}
