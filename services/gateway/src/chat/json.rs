//! JSON exactly as Python's `json.dumps(value, ensure_ascii=False)` writes it — the official
//! encoder embeds tool schemas and arguments that way: `", "` between items, `": "` after keys,
//! keys in their original order, non-ASCII characters as themselves.

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::{Formatter, Serializer};
use std::io;

struct PythonStyle;

impl Formatter for PythonStyle {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

pub fn dumps(value: &Value) -> String {
    let mut out = Vec::new();
    value.serialize(&mut Serializer::with_formatter(&mut out, PythonStyle)).expect("JSON values always serialise");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_separators_order_and_unicode() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, "x"], "a": {"é": null, "q": "\"quoted\"\n"}}"#).unwrap();
        // What Python prints for json.dumps(v, ensure_ascii=False).
        assert_eq!(dumps(&v), r#"{"b": [1, 2.5, "x"], "a": {"é": null, "q": "\"quoted\"\n"}}"#);
        assert_eq!(dumps(&Value::String("22°C".into())), "\"22°C\"");
    }
}
