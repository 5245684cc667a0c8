//! `--log-format=json`: one flat JSON object per line with `ts` (RFC 3339), `level`, `msg`,
//! `logger` (the module) and the event's fields, as log pipelines built for controller-runtime
//! operators (zap's production encoder) expect. tracing-subscriber's own JSON nests the fields
//! and names them `timestamp` and `fields.message`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The formatter; spans are not logged (the operator puts what matters in fields).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = line(
            &jiff::Timestamp::now().to_string(),
            meta.level().as_str(),
            meta.target(),
            fields,
        );
        writeln!(writer, "{line}")
    }
}

/// An event's fields, its message apart.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => {
                self.msg = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                }
            }
            name => {
                self.rest.insert(name.to_string(), value);
            }
        }
    }
}

/// One log line. A field named like one of the fixed keys keeps its value under `field.<name>`
/// rather than overwrite it.
fn line(ts: &str, level: &str, target: &str, fields: Fields) -> String {
    let mut out = Map::new();
    out.insert("ts".into(), ts.into());
    out.insert("level".into(), level.to_ascii_lowercase().into());
    out.insert("msg".into(), fields.msg.into());
    out.insert("logger".into(), target.into());
    for (key, value) in fields.rest {
        let key = if out.contains_key(&key) {
            format!("field.{key}")
        } else {
            key
        };
        out.insert(key, value);
    }
    Value::Object(out).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_flat_with_ts_level_msg() {
        let mut fields = Fields {
            msg: "labels written".into(),
            rest: Map::new(),
        };
        fields.rest.insert("pod".into(), "vault-0".into());
        fields.rest.insert("level".into(), 3.into());
        let text = line(
            "2026-12-01T23:59:00Z",
            "INFO",
            "vault_registrar::act",
            fields,
        );
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["ts"], "2026-12-01T23:59:00Z");
        assert_eq!(parsed["level"], "info");
        assert_eq!(parsed["msg"], "labels written");
        assert_eq!(parsed["logger"], "vault_registrar::act");
        assert_eq!(parsed["pod"], "vault-0");
        assert_eq!(
            parsed["field.level"], 3,
            "a field cannot overwrite a fixed key"
        );
    }
}
