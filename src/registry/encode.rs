//! A JSON payload as the value a schema-aware consumer reads: encoded (or
//! validated) against its schema and framed in the Confluent wire format.
//!
//! Invariant: `encode` either returns bytes a Confluent deserializer
//! decodes with the schema of id `Resolved::id`, or says why the payload
//! does not fit that schema; it never sends a value the schema rejects.

use super::{Compiled, Resolved};

/// The wire format's first byte, Confluent's framing version.
const MAGIC: u8 = 0;

/// Validation errors named in a poison row's reason; the rest are counted.
const ERRORS_SHOWN: usize = 5;

impl Resolved {
    /// `payload` (JSON) as the record value: magic byte, the schema id as a
    /// 4-byte big-endian number, then the Avro binary encoding (for Avro)
    /// or the payload's own bytes once they validate (for JSON Schema).
    pub fn encode(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let json: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| format!("the payload is not JSON ({e})"))?;
        let mut value = Vec::with_capacity(5 + payload.len());
        value.push(MAGIC);
        value.extend_from_slice(&self.id.to_be_bytes());
        match &self.schema {
            Compiled::Avro(schema) => {
                let datum = super::avro::from_json(&json, schema)
                    .and_then(|datum| {
                        apache_avro::to_avro_datum(schema, datum).map_err(|e| e.to_string())
                    })
                    .map_err(|e| self.mismatch(&e))?;
                value.extend_from_slice(&datum);
            }
            Compiled::Json(validator) => {
                let errors: Vec<String> = validator
                    .iter_errors(&json)
                    .map(|error| {
                        let at = error.instance_path.to_string();
                        if at.is_empty() {
                            error.to_string()
                        } else {
                            format!("{error} at {at}")
                        }
                    })
                    .collect();
                if !errors.is_empty() {
                    let mut why = errors[..errors.len().min(ERRORS_SHOWN)].join("; ");
                    if errors.len() > ERRORS_SHOWN {
                        why.push_str(&format!("; and {} more", errors.len() - ERRORS_SHOWN));
                    }
                    return Err(self.mismatch(&why));
                }
                value.extend_from_slice(payload);
            }
        }
        Ok(value)
    }

    fn mismatch(&self, why: &str) -> String {
        format!(
            "the payload does not match the schema of subject `{}` (version {}, id {}): {why}",
            self.subject, self.version, self.id
        )
    }
}
