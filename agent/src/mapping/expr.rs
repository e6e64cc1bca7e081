//! CEL expressions over a record's canonical fields: filters and computed fields.
//!
//! An expression is compiled once, when the agent starts; each canonical field it
//! names is a variable, null where the record has no value.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, Program};
use chrono::DateTime;
use crdt_model::{Record, Timestamp, Value};

/// A compiled expression.
#[derive(Clone)]
pub(crate) struct Expr {
    source: String,
    program: Arc<Program>,
    /// The variables it reads, sorted.
    variables: Vec<String>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    /// Compiles `source`; the error is the parser's message.
    pub(crate) fn compile(source: &str) -> Result<Expr, String> {
        // The parser's first line says what and where; the rest draws the spot.
        let program = Program::compile(source).map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first
                .trim_start_matches("ERROR: <input>:")
                .trim()
                .to_owned()
        })?;
        let mut variables: Vec<String> = program
            .references()
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect();
        variables.sort();
        Ok(Expr {
            source: source.to_owned(),
            program: Arc::new(program),
            variables,
        })
    }

    /// The expression's text.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// The canonical fields it reads.
    pub(crate) fn variables(&self) -> &[String] {
        &self.variables
    }

    /// The expression's value for a record with `fields`.
    pub(crate) fn eval(&self, fields: &Record) -> Result<Value, String> {
        // The standard library is built once: building it per evaluation (what
        // `Context::default` does) cost more than the evaluation itself.
        static STDLIB: OnceLock<Arc<Env>> = OnceLock::new();
        let mut context = Context::Root {
            functions: Default::default(),
            variables: Default::default(),
            resolver: None,
            env: STDLIB.get_or_init(|| Arc::new(Env::stdlib())).clone(),
        };
        for name in &self.variables {
            let value = fields.get(name).map_or(cel::Value::Null, to_cel);
            context.add_variable_from_value(name.clone(), value);
        }
        let value = self.program.execute(&context).map_err(|e| e.to_string())?;
        from_cel(&value)
    }

    /// Whether a record with `fields` passes the expression (a filter).
    pub(crate) fn test(&self, fields: &Record) -> Result<bool, String> {
        match self.eval(fields)? {
            Value::Bool(pass) => Ok(pass),
            other => Err(format!(
                "a filter must be true or false, and this one is {} {other}",
                other.type_name()
            )),
        }
    }
}

/// A field value as CEL sees it: decimals become doubles (CEL has no decimal type).
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(x) => cel::Value::Float(*x),
        Value::Decimal(d) => cel::Value::Float(d.as_str().parse().unwrap_or(f64::NAN)),
        Value::Text(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Timestamp(t) => DateTime::from_timestamp_micros(t.micros())
            .map_or(cel::Value::Null, |t| {
                cel::Value::Timestamp(t.fixed_offset())
            }),
        Value::List(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Map(map) => cel::Value::Map(Map {
            map: Arc::new(
                map.iter()
                    .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                    .collect::<HashMap<_, _>>(),
            ),
        }),
    }
}

/// A CEL value as a field value; functions, bytes and durations have none.
fn from_cel(value: &cel::Value) -> Result<Value, String> {
    Ok(match value {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::Int(*i),
        cel::Value::UInt(u) => Value::Int(
            i64::try_from(*u).map_err(|_| format!("{u} is too large for an integer field"))?,
        ),
        cel::Value::Float(x) => Value::Float(*x),
        cel::Value::String(s) => Value::Text(s.as_str().to_owned()),
        cel::Value::Timestamp(t) => Value::Timestamp(Timestamp::from_micros(t.timestamp_micros())),
        cel::Value::List(items) => {
            Value::List(items.iter().map(from_cel).collect::<Result<_, _>>()?)
        }
        cel::Value::Map(map) => Value::Map(
            map.map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Key::String(s) => s.as_str().to_owned(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    Ok((key, from_cel(v)?))
                })
                .collect::<Result<_, String>>()?,
        ),
        other => {
            return Err(format!(
                "the expression's value {other:?} is not a field value"
            ));
        }
    })
}
