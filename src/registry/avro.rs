//! A JSON payload as an Avro value, guided by the schema.
//!
//! Invariant: every JSON value maps to the Avro value that means the same
//! thing, or to an error naming where it does not fit; nothing is narrowed
//! silently (apache-avro's own `resolve` truncates a long into an int, so
//! it is only used for logical types, after their range is checked).

use std::collections::HashMap;

use apache_avro::schema::{Name, ResolvedSchema, Schema, UnionSchema};
use apache_avro::types::Value;
use serde_json::Value as Json;

/// Named types (records, enums, fixed) by full name, for `Ref`s.
type Names<'s> = HashMap<Name, &'s Schema>;

/// `json` as a value of `schema`, ready for `to_avro_datum`.
pub fn from_json(json: &Json, schema: &Schema) -> Result<Value, String> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| e.to_string())?;
    convert(json, schema, resolved.get_names(), "$")
}

fn convert(json: &Json, schema: &Schema, names: &Names<'_>, at: &str) -> Result<Value, String> {
    let mismatch = || {
        Err(format!(
            "{at}: {} does not fit Avro type {}",
            describe(json),
            kind(schema)
        ))
    };
    Ok(match (schema, json) {
        (Schema::Null, Json::Null) => Value::Null,
        (Schema::Boolean, Json::Bool(b)) => Value::Boolean(*b),
        (Schema::Int, Json::Number(n)) => match n.as_i64().map(i32::try_from) {
            Some(Ok(n)) => Value::Int(n),
            _ => return mismatch(),
        },
        (Schema::Long, Json::Number(n)) => match n.as_i64() {
            Some(n) => Value::Long(n),
            None => return mismatch(),
        },
        (Schema::Float, Json::Number(n)) => match n.as_f64() {
            Some(f) => Value::Float(f as f32),
            None => return mismatch(),
        },
        (Schema::Double, Json::Number(n)) => match n.as_f64() {
            Some(f) => Value::Double(f),
            None => return mismatch(),
        },
        (Schema::String, Json::String(s)) => Value::String(s.clone()),
        // Avro's JSON encoding: bytes and fixed as strings of code points
        // 0–255, one per byte.
        (Schema::Bytes, Json::String(s)) => match latin1(s) {
            Some(bytes) => Value::Bytes(bytes),
            None => return mismatch(),
        },
        (Schema::Fixed(fixed), Json::String(s)) => match latin1(s) {
            Some(bytes) if bytes.len() == fixed.size => Value::Fixed(fixed.size, bytes),
            _ => return mismatch(),
        },
        (Schema::Enum(e), Json::String(s)) => match e.symbols.iter().position(|x| x == s) {
            Some(index) => Value::Enum(index as u32, s.clone()),
            None => {
                return Err(format!(
                    "{at}: `{s}` is not a symbol of enum {} ({})",
                    e.name,
                    e.symbols.join(", ")
                ))
            }
        },
        (Schema::Array(array), Json::Array(items)) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| convert(item, &array.items, names, &format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Map(map), Json::Object(entries)) => Value::Map(
            entries
                .iter()
                .map(|(key, value)| {
                    convert(value, &map.types, names, &format!("{at}.{key}"))
                        .map(|value| (key.clone(), value))
                })
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Record(record), Json::Object(entries)) => {
            let mut fields = Vec::with_capacity(record.fields.len());
            for field in &record.fields {
                let field_at = format!("{at}.{}", field.name);
                let value = match (entries.get(&field.name), &field.default) {
                    (Some(value), _) => convert(value, &field.schema, names, &field_at)?,
                    (None, Some(default)) => convert(default, &field.schema, names, &field_at)?,
                    (None, None) => {
                        return Err(format!(
                            "{field_at}: missing, and record {} gives it no default",
                            record.name
                        ))
                    }
                };
                fields.push((field.name.clone(), value));
            }
            Value::Record(fields)
        }
        (Schema::Union(union), _) => return union_value(json, union, names, at),
        (Schema::Ref { name }, _) => match names.get(name) {
            Some(named) => return convert(json, named, names, at),
            None => {
                return Err(format!(
                    "{at}: the schema names {name}, which it does not define"
                ))
            }
        },
        // Logical types on int: their range first, for resolve narrows.
        (Schema::Date | Schema::TimeMillis, Json::Number(n)) => match n.as_i64() {
            Some(n) if i32::try_from(n).is_ok() => logical(Value::Long(n), schema, at)?,
            _ => return mismatch(),
        },
        (
            Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos,
            Json::Number(n),
        ) => match n.as_i64() {
            Some(n) => logical(Value::Long(n), schema, at)?,
            None => return mismatch(),
        },
        (Schema::Uuid, Json::String(s)) => logical(Value::String(s.clone()), schema, at)?,
        (Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration, Json::String(s)) => {
            match latin1(s) {
                Some(bytes) => logical(Value::Bytes(bytes), schema, at)?,
                None => return mismatch(),
            }
        }
        _ => return mismatch(),
    })
}

/// The first branch `json` fits, integers trying the integral branches
/// before `float`/`double` so `5` stays an int where the union has one.
fn union_value(
    json: &Json,
    union: &UnionSchema,
    names: &Names<'_>,
    at: &str,
) -> Result<Value, String> {
    let integral = matches!(json, Json::Number(n) if n.is_i64() || n.is_u64());
    let passes: &[bool] = if integral { &[true, false] } else { &[false] };
    for &skip_floats in passes {
        for (index, branch) in union.variants().iter().enumerate() {
            if skip_floats && matches!(branch, Schema::Float | Schema::Double) {
                continue;
            }
            if let Ok(value) = convert(json, branch, names, at) {
                return Ok(Value::Union(index as u32, Box::new(value)));
            }
        }
    }
    let kinds: Vec<String> = union.variants().iter().map(kind).collect();
    Err(format!(
        "{at}: {} fits no branch of the union [{}]",
        describe(json),
        kinds.join(", ")
    ))
}

fn logical(value: Value, schema: &Schema, at: &str) -> Result<Value, String> {
    value
        .resolve(schema)
        .map_err(|e| format!("{at}: does not fit {}: {e}", kind(schema)))
}

/// A string of code points 0–255 as bytes.
fn latin1(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

fn describe(json: &Json) -> String {
    let text = json.to_string();
    if text.len() > 60 {
        let cut = (0..=60)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}…", &text[..cut])
    } else {
        text
    }
}

fn kind(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name),
        Schema::Enum(e) => format!("enum {}", e.name),
        Schema::Fixed(f) => format!("fixed {} ({} bytes)", f.name, f.size),
        Schema::Ref { name } => name.to_string(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(_) => "union".into(),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}
