//! Turning config values into a file's bytes, per [`FileFormat`]. Pure
//! functions: the materializer reads, this renders, the atomic writer
//! compares and writes.
//!
//! The output is deterministic (names in key order, fixed layout), so the
//! same values always give the same bytes and an unchanged config never
//! rewrites its file. A value the format cannot carry is an error naming the
//! key; the caller then leaves the file as it is.

use std::collections::BTreeMap;

use crate::config::FileFormat;

/// The bytes of a `json` or `properties` file holding `entries` (name to
/// value). `raw` files are the value itself and do not come here.
pub fn render(format: FileFormat, entries: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
    match format {
        FileFormat::Raw => Err("format: raw renders one value, not a map".into()),
        FileFormat::Json => json(entries),
        FileFormat::Properties => properties(entries),
    }
}

fn text<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(value).map_err(|_| format!("the value of {name:?} is not UTF-8 text"))
}

/// A JSON object of string values, two-space indented, with a final
/// newline. Values stay strings (never parsed), so a value that happens to
/// look like a number keeps its exact text.
fn json(entries: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut object = serde_json::Map::new();
    for (name, value) in entries {
        object.insert(name.clone(), serde_json::Value::String(text(name, value)?.to_string()));
    }
    // Inserted in key order, so the object is in key order whether
    // serde_json's map sorts or keeps insertion order.
    let mut out = serde_json::to_vec_pretty(&serde_json::Value::Object(object)).map_err(|e| format!("json: {e}"))?;
    out.push(b'\n');
    Ok(out)
}

/// `name=value` lines. No escaping: a name with `=` or a line break, or a
/// value with a line break, cannot be written faithfully and is refused.
fn properties(entries: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (name, value) in entries {
        let v = text(name, value)?;
        if name.contains(['=', '\n', '\r']) {
            return Err(format!("the name {name:?} contains '=' or a line break"));
        }
        if v.contains(['\n', '\r']) {
            return Err(format!("the value of {name:?} contains a line break"));
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// The name a key has in a prefix rule's file: without the prefix when
/// `strip` is set. `None` for the key equal to the prefix when stripped (it
/// would have an empty name; it is left out).
pub fn name_of(key: &str, prefix: &str, strip: bool) -> Option<String> {
    if !strip {
        return Some(key.to_string());
    }
    key.strip_prefix(prefix).filter(|n| !n.is_empty()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn json_is_an_object_of_strings_in_key_order() {
        let out = render(FileFormat::Json, &map(&[("port", "8080"), ("host", "db \"1\""), ("a/b", "x")])).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n  \"a/b\": \"x\",\n  \"host\": \"db \\\"1\\\"\",\n  \"port\": \"8080\"\n}\n"
        );
        assert_eq!(render(FileFormat::Json, &BTreeMap::new()).unwrap(), b"{}\n");
    }

    #[test]
    fn properties_are_sorted_lines() {
        let out = render(FileFormat::Properties, &map(&[("port", "8080"), ("host", "db=1 # not a comment")])).unwrap();
        assert_eq!(out, b"host=db=1 # not a comment\nport=8080\n");
        assert_eq!(render(FileFormat::Properties, &BTreeMap::new()).unwrap(), b"");
    }

    #[test]
    fn what_a_format_cannot_carry_is_refused_naming_the_key() {
        let err = render(FileFormat::Properties, &map(&[("motd", "two\nlines")])).unwrap_err();
        assert!(err.contains("\"motd\"") && err.contains("line break"), "{err}");
        let err = render(FileFormat::Properties, &map(&[("a=b", "1")])).unwrap_err();
        assert!(err.contains("\"a=b\""), "{err}");
        let mut bad = BTreeMap::new();
        bad.insert("blob".to_string(), vec![0xff, 0xfe]);
        for f in [FileFormat::Json, FileFormat::Properties] {
            assert!(render(f, &bad).unwrap_err().contains("\"blob\" is not UTF-8"));
        }
        // JSON can carry line breaks (escaped).
        assert_eq!(render(FileFormat::Json, &map(&[("m", "a\nb")])).unwrap(), b"{\n  \"m\": \"a\\nb\"\n}\n");
    }

    #[test]
    fn names_strip_the_prefix_when_asked() {
        assert_eq!(name_of("app/db/host", "app/db/", true).as_deref(), Some("host"));
        assert_eq!(name_of("app/db/host", "app/db/", false).as_deref(), Some("app/db/host"));
        assert_eq!(name_of("app/db/", "app/db/", true), None);
        assert_eq!(name_of("app/dbx", "app/db", true).as_deref(), Some("x"));
    }
}
