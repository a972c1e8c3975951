//! `outboxes:`: several outboxes in one file, each a partial config laid
//! over the file's top-level keys.
//!
//! Invariant: each outbox ends up a complete, ordinary [`Config`], checked
//! exactly as a one-outbox file is, so everything downstream (set-up, the
//! relay, `check`, `status`) handles one outbox at a time and never knows
//! there are others. The top-level keys are the defaults every outbox
//! inherits; an outbox's own keys win, mapping by mapping. `log` and
//! `http` belong to the process and can only be set at the top.
//! Environment overrides follow the same layers: `OUTBOXD__SECTION__KEY`
//! overrides the top level, `OUTBOXD__OUTBOXES__<NAME>__SECTION__KEY` one
//! outbox (its name upper-cased, `-` as `_`), above its own keys.

use config::{Map, Source, Value, ValueKind};

use super::{Config, ENV_PREFIX};

/// The key listing the outboxes.
pub const OUTBOXES_KEY: &str = "outboxes";

/// Sections an outbox may set for itself.
const PER_OUTBOX_SECTIONS: [&str; 5] = ["relay", "postgres", "kafka", "capture", "routing"];

/// Sections only the process has one of.
const PROCESS_SECTIONS: [&str; 2] = ["log", "http"];

/// One layer of keys, as a source the `config` crate merges deeply.
#[derive(Clone, Debug)]
struct Layer(Map<String, Value>);

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// The environment variables that override config keys, split by layer.
pub struct Environment {
    /// `OUTBOXD__…` except the per-outbox ones.
    top_level: Map<String, String>,
    /// `OUTBOXD__OUTBOXES__…`.
    per_outbox: Map<String, String>,
}

impl Environment {
    pub fn from_process() -> Environment {
        Environment::from_vars(std::env::vars())
    }

    fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Environment {
        let per_outbox_prefix = format!("{ENV_PREFIX}__{}__", OUTBOXES_KEY.to_uppercase());
        let mut top_level = Map::new();
        let mut per_outbox = Map::new();
        for (name, value) in vars {
            if name.to_uppercase().starts_with(&per_outbox_prefix) {
                per_outbox.insert(name, value);
            } else {
                top_level.insert(name, value);
            }
        }
        Environment {
            top_level,
            per_outbox,
        }
    }

    /// The source of the top-level overrides.
    pub fn top_level(&self) -> config::Environment {
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(Some(self.top_level.clone()))
    }

    /// The source of the overrides of the outbox called `name`.
    fn outbox(&self, name: &str) -> config::Environment {
        let prefix = format!(
            "{ENV_PREFIX}__{}__{}",
            OUTBOXES_KEY.to_uppercase(),
            name.to_uppercase().replace('-', "_")
        );
        config::Environment::with_prefix(&prefix)
            .prefix_separator("__")
            .separator("__")
            .source(Some(self.per_outbox.clone()))
    }

    /// A per-outbox variable naming no outbox of the file: a typo that
    /// would otherwise be ignored.
    fn unmatched(&self, names: &[String]) -> Option<&str> {
        let prefixes: Vec<String> = names
            .iter()
            .map(|name| {
                format!(
                    "{ENV_PREFIX}__{}__{}__",
                    OUTBOXES_KEY.to_uppercase(),
                    name.to_uppercase().replace('-', "_")
                )
            })
            .collect();
        self.per_outbox
            .keys()
            .find(|var| {
                let var = var.to_uppercase();
                !prefixes.iter().any(|prefix| var.starts_with(prefix))
            })
            .map(String::as_str)
    }
}

/// The file's keys (top-level overrides applied) → one [`Config`] per
/// outbox: the whole file when it has no `outboxes`, else one per entry,
/// each with its own overrides from `environment`. Errors start with
/// `outboxes[i] (name): ` and then the key, as a one-outbox file's do.
pub fn expand(top: Map<String, Value>, environment: &Environment) -> Result<Vec<Config>, String> {
    let mut top = top;
    let Some(list) = top.remove(OUTBOXES_KEY) else {
        if let Some(var) = environment.unmatched(&[]) {
            return Err(format!(
                "environment variable {var}: the config lists no `{OUTBOXES_KEY}`; override its \
                 keys with {ENV_PREFIX}__SECTION__KEY"
            ));
        }
        return Ok(vec![deserialize(top)?]);
    };
    let entries = list
        .into_array()
        .map_err(|_| format!("{OUTBOXES_KEY}: must be a list of outboxes, each with a `name`"))?;
    if entries.is_empty() {
        return Err(format!(
            "{OUTBOXES_KEY}: is empty; list at least one outbox, or remove the key to relay \
             the one `postgres.table`"
        ));
    }
    check_top_level_shape(&top)?;
    let mut configs = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let mut entry = entry.into_table().map_err(|_| {
            format!("{OUTBOXES_KEY}[{index}]: must be a mapping with a `name` and the keys it sets")
        })?;
        let name = match entry.remove("name").map(|v| v.kind) {
            Some(ValueKind::String(name)) => name,
            Some(_) => {
                return Err(format!("{OUTBOXES_KEY}[{index}].name: must be a string"));
            }
            None => {
                return Err(format!(
                    "{OUTBOXES_KEY}[{index}].name: missing; every outbox needs its own name (its \
                     relay name: slot, metrics label, logs)"
                ));
            }
        };
        let prefix = format!("{OUTBOXES_KEY}[{index}] ({name})");
        if let Some(key) = entry
            .keys()
            .find(|k| PROCESS_SECTIONS.contains(&k.as_str()))
        {
            return Err(format!(
                "{prefix}.{key}: belongs to the whole process; set it once at the top level"
            ));
        }
        if let Some(key) = entry
            .keys()
            .find(|k| !PER_OUTBOX_SECTIONS.contains(&k.as_str()))
        {
            return Err(format!(
                "{prefix}.{key}: unknown key; an outbox may set name, {}",
                PER_OUTBOX_SECTIONS.join(", ")
            ));
        }
        if entry
            .get("relay")
            .and_then(|relay| relay.clone().into_table().ok())
            .is_some_and(|relay| relay.contains_key("name"))
        {
            return Err(format!(
                "{prefix}.relay.name: an outbox's relay name is its `name`; remove relay.name"
            ));
        }
        let merged = config::Config::builder()
            .add_source(Layer(top.clone()))
            .add_source(Layer(entry))
            .add_source(environment.outbox(&name))
            .set_override("relay.name", name.clone())
            .and_then(|builder| builder.build())
            .map_err(|e| format!("{prefix}: {e}"))?;
        let table = merged
            .cache
            .into_table()
            .map_err(|e| format!("{prefix}: {e}"))?;
        let config = deserialize(table).map_err(|e| format!("{prefix}: {e}"))?;
        configs.push(config);
    }
    let names: Vec<String> = configs.iter().map(|c| c.relay.name.clone()).collect();
    if let Some(var) = environment.unmatched(&names) {
        return Err(format!(
            "environment variable {var}: names no outbox of the file ({}); per-outbox overrides \
             are {ENV_PREFIX}__{}__<NAME>__SECTION__KEY, the name upper-cased with `-` as `_`",
            names.join(", "),
            OUTBOXES_KEY.to_uppercase()
        ));
    }
    Ok(configs)
}

/// The top-level keys on their own: an unknown key or a wrong type there
/// is named as the top level's, not as the first outbox's (which inherits
/// it). The keys every outbox may set for itself instead are filled in
/// for this check only.
fn check_top_level_shape(top: &Map<String, Value>) -> Result<(), String> {
    let shaped = config::Config::builder()
        .add_source(Layer(top.clone()))
        .set_default("relay.name", "top-level")
        .and_then(|b| b.set_default("postgres.url", "postgres://top-level"))
        .and_then(|b| b.set_default("kafka.bootstrap_servers", "top-level:9092"))
        .and_then(|b| b.build())
        .and_then(|c| c.try_deserialize::<Config>());
    shaped
        .map(|_| ())
        .map_err(|e| format!("{e} (in the top-level keys, which every outbox inherits)"))
}

fn deserialize(keys: Map<String, Value>) -> Result<Config, String> {
    let mut config: Config = Value::new(None, ValueKind::Table(keys))
        .try_deserialize()
        .map_err(|e| e.to_string())?;
    config.kafka.properties =
        super::normalize_property_keys(std::mem::take(&mut config.kafka.properties));
    config.validate()?;
    Ok(config)
}

/// What several outboxes of one file must not share: a relay name; a slot
/// (anywhere in the file); a table (or message prefix), a publication or
/// an emit function in one database. Each clash
/// names both outboxes and the key to change.
pub fn check_distinct(outboxes: &[Distinct]) -> Result<(), String> {
    for (i, later) in outboxes.iter().enumerate() {
        for earlier in &outboxes[..i] {
            let clash = |what: &str, key: &str, value: &str| {
                Err(format!(
                    "{OUTBOXES_KEY}[{i}] ({}).{key}: {what} `{value}` is also outbox `{}`'s; \
                     each outbox needs its own",
                    later.name, earlier.name
                ))
            };
            if later.name == earlier.name {
                return clash("the name", "name", &later.name);
            }
            // A slot belongs to a whole server, and one server can be
            // named two ways (`localhost`, `127.0.0.1`, a DNS alias), which
            // the URLs' text cannot tell apart: so slots differ across the
            // file. Defaults (`outboxd_<name>`) always do, but for `a-b`
            // beside `a_b`.
            if later.slot == earlier.slot {
                return clash("the slot", "capture.slot", &later.slot);
            }
            if later.server != earlier.server || later.database != earlier.database {
                continue;
            }
            if later.source == earlier.source {
                return clash(
                    "in the same database, the source",
                    "postgres.table",
                    &later.source,
                );
            }
            if later.publication == earlier.publication {
                return clash(
                    "in the same database, the publication",
                    "postgres.publication",
                    &later.publication,
                );
            }
            if let (Some(later_emit), Some(earlier_emit)) =
                (&later.emit_function, &earlier.emit_function)
            {
                if later_emit == earlier_emit {
                    // `migrate` writes the function with the outbox's
                    // prefix, so the second would replace the first and
                    // carry its service's events to the other outbox.
                    return Err(format!(
                        "{OUTBOXES_KEY}[{i}] ({}).postgres.table: in the same database, the emit \
                         function `{later_emit}` is also outbox `{}`'s; it emits with one prefix, \
                         so each message outbox needs its own schema (postgres.table: \
                         <schema>.outbox puts its function in <schema>)",
                        later.name, earlier.name
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The names of one outbox that no other in the file may share.
pub struct Distinct {
    pub name: String,
    /// Host and port of `postgres.url`.
    pub server: String,
    /// The database name of `postgres.url`.
    pub database: String,
    /// `schema.table`, or `messages:<prefix>`.
    pub source: String,
    pub slot: String,
    pub publication: String,
    /// A message outbox's `<schema>.outboxd_emit` (the schema of
    /// `postgres.table`), which writes its prefix; `None` for a table.
    pub emit_function: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(yaml: &str) -> Map<String, Value> {
        config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .build()
            .unwrap()
            .cache
            .into_table()
            .unwrap()
    }

    fn no_environment() -> Environment {
        Environment::from_vars([])
    }

    fn environment(vars: &[(&str, &str)]) -> Environment {
        Environment::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn environment_overrides_the_top_level_or_one_outbox() {
        let yaml = format!(
            "{TOP}outboxes:
  - name: orders
    postgres:
      table: orders.outbox
      url: postgres://outboxd@db/orders
  - name: billing-eu
    postgres:
      table: billing.outbox
"
        );
        let vars = environment(&[
            (
                "OUTBOXD__OUTBOXES__ORDERS__POSTGRES__URL",
                "postgres://outboxd:secret@db/orders",
            ),
            ("OUTBOXD__OUTBOXES__BILLING_EU__CAPTURE__BATCH_SIZE", "7"),
            ("PATH", "/usr/bin"),
        ]);
        let configs = expand(keys(&yaml), &vars).unwrap();
        assert_eq!(
            configs[0].postgres.url,
            "postgres://outboxd:secret@db/orders"
        );
        assert_eq!(configs[0].capture.batch_size, 2_000);
        assert_eq!(configs[1].capture.batch_size, 7);
        assert_eq!(
            configs[1].postgres.url,
            "postgres://outboxd@localhost/orders"
        );

        let typo = environment(&[("OUTBOXD__OUTBOXES__ORDRES__POSTGRES__URL", "x")]);
        let error = expand(keys(&yaml), &typo).unwrap_err();
        assert!(
            error.contains("OUTBOXD__OUTBOXES__ORDRES__POSTGRES__URL: names no outbox")
                && error.contains("orders, billing-eu"),
            "{error}"
        );
        let error = expand(keys(TOP), &typo).unwrap_err();
        assert!(error.contains("lists no `outboxes`"), "{error}");
    }

    const TOP: &str = "\
relay:
  name: sidecar
  after_publish: delete
postgres:
  url: postgres://outboxd@localhost/orders
  columns:
    payload: body
kafka:
  bootstrap_servers: localhost:9092
";

    #[test]
    fn a_file_without_outboxes_is_one_outbox() {
        let configs = expand(keys(TOP), &no_environment()).unwrap();
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].relay.name, "sidecar");
    }

    #[test]
    fn each_outbox_inherits_the_top_and_overrides_mapping_by_mapping() {
        let yaml = format!(
            "{TOP}outboxes:
  - name: orders
    postgres:
      table: orders.outbox
  - name: billing
    relay:
      after_publish: mark
    postgres:
      url: postgres://outboxd@other/billing
      table: billing.outbox
      publication: billing_publication
      columns:
        id: event_id
    capture:
      mode: polling
"
        );
        let configs = expand(keys(&yaml), &no_environment()).unwrap();
        assert_eq!(configs.len(), 2);
        let (orders, billing) = (&configs[0], &configs[1]);
        assert_eq!(orders.relay.name, "orders");
        assert_eq!(orders.postgres.table, "orders.outbox");
        assert_eq!(
            orders.relay.after_publish,
            crate::config::AfterPublish::Delete
        );
        assert_eq!(orders.postgres.columns.payload, "body");
        assert_eq!(billing.relay.name, "billing");
        assert_eq!(
            billing.relay.after_publish,
            crate::config::AfterPublish::Mark
        );
        assert_eq!(billing.postgres.url, "postgres://outboxd@other/billing");
        // A nested mapping merges: the entry's `id` and the top's `payload`.
        assert_eq!(billing.postgres.columns.id, "event_id");
        assert_eq!(billing.postgres.columns.payload, "body");
        assert_eq!(billing.capture.mode, crate::config::CaptureMode::Polling);
        assert_eq!(billing.slot_name(), "outboxd_billing");
    }

    #[test]
    fn an_entry_names_its_own_mistakes() {
        let cases = [
            ("outboxes: []\n", "outboxes: is empty"),
            ("outboxes: {name: x}\n", "outboxes: must be a list"),
            (
                "outboxes:\n  - postgres: {table: a}\n",
                "outboxes[0].name: missing",
            ),
            (
                "outboxes:\n  - name: a\n    http: {listen: '127.0.0.1:1'}\n",
                "outboxes[0] (a).http: belongs to the whole process",
            ),
            (
                "outboxes:\n  - name: a\n    postgress: {table: a}\n",
                "outboxes[0] (a).postgress: unknown key",
            ),
            (
                "outboxes:\n  - name: a\n    relay: {name: b}\n",
                "outboxes[0] (a).relay.name:",
            ),
            (
                "outboxes:\n  - name: a\n  - name: b\n    capture: {batch_size: 0}\n",
                "outboxes[1] (b): capture.batch_size",
            ),
            (
                "outboxes:\n  - name: a\n    postgres: {tabel: x}\n",
                "outboxes[0] (a): ",
            ),
            (
                "capture: {batch_sise: 3}\noutboxes:\n  - name: a\n",
                "(in the top-level keys, which every outbox inherits)",
            ),
        ];
        for (entries, expected) in cases {
            let error = expand(keys(&format!("{TOP}{entries}")), &no_environment()).unwrap_err();
            assert!(error.contains(expected), "{entries}: {error}");
        }
    }

    /// `database` as `server/name`.
    fn distinct(name: &str, database: &str, source: &str, publication: &str) -> Distinct {
        let (server, database) = database.split_once('/').unwrap();
        Distinct {
            name: name.into(),
            server: server.into(),
            database: database.into(),
            source: source.into(),
            slot: format!("outboxd_{name}"),
            publication: publication.into(),
            emit_function: None,
        }
    }

    #[test]
    fn outboxes_may_not_share_a_table_slot_or_publication_in_one_database() {
        let orders = || distinct("orders", "db:5432/shop", "orders.outbox", "orders_pub");
        check_distinct(&[
            orders(),
            distinct("billing", "db:5432/shop", "billing.outbox", "billing_pub"),
            // Another database may reuse the table and publication names.
            distinct("shipping", "db2:5432/shop", "orders.outbox", "orders_pub"),
        ])
        .unwrap();
        let clash = |other: Distinct, expected: &str| {
            let error = check_distinct(&[orders(), other]).unwrap_err();
            assert!(error.contains(expected), "{error}");
            assert!(error.contains("outbox `orders`"), "{error}");
        };
        clash(
            distinct("orders", "db2:5432/x", "a.outbox", "p"),
            "outboxes[1] (orders).name",
        );
        clash(
            distinct("billing", "db:5432/shop", "orders.outbox", "p"),
            ".postgres.table",
        );
        clash(
            distinct("billing", "db:5432/shop", "billing.outbox", "orders_pub"),
            ".postgres.publication",
        );
        let mut same_slot = distinct("billing", "db:5432/shop", "billing.outbox", "p");
        same_slot.slot = "outboxd_orders".into();
        clash(same_slot, ".capture.slot");
        // A slot is the server's, and a server has many names: no two
        // outboxes of the file share one, whatever their URLs say.
        let mut same_slot_other_database =
            distinct("billing", "db:5432/billing", "orders.outbox", "orders_pub");
        same_slot_other_database.slot = "outboxd_orders".into();
        clash(same_slot_other_database, "the slot `outboxd_orders`");
        let mut same_slot_server_spelled_otherwise =
            distinct("billing", "localhost:5432/shop", "billing.outbox", "p");
        same_slot_server_spelled_otherwise.slot = "outboxd_orders".into();
        clash(
            same_slot_server_spelled_otherwise,
            "the slot `outboxd_orders`",
        );
        // Two message outboxes of one database: one emit function per schema.
        let messages = |name: &str, schema: &str| {
            let mut outbox = distinct(
                name,
                "db:5432/shop",
                &format!("messages:{name}"),
                &format!("{name}_pub"),
            );
            outbox.emit_function = Some(format!("{schema}.outboxd_emit"));
            outbox
        };
        let error =
            check_distinct(&[messages("pa", "public"), messages("pb", "public")]).unwrap_err();
        assert!(
            error.contains("outboxes[1] (pb).postgres.table") && error.contains("outboxd_emit"),
            "{error}"
        );
        check_distinct(&[messages("pa", "sales"), messages("pb", "public")]).unwrap();
    }
}
