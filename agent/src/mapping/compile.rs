//! Compiling a tool collection's configuration into its [`Mapping`], and a
//! collection's natural key: every error names the file, the line and the entry.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use chrono_tz::Tz;
use connectors::FieldType;
use crdt_model::Value;
use rust_decimal::Decimal as Exact;
use toml::Spanned;

use super::Mapping;
use super::expr::Expr;
use super::field::{EnumMap, FieldMap, NumberKind, Step, format_is_valid};
use super::natural_key::{NORMALIZE_DEFAULT, NaturalKey};
use crate::config::{CollectionConfig, Config, ConfigError, Conversion, Direction, FieldConfig};

/// The mapping of collection `i` of tool `t`. `types` are the tool's column types
/// when known (the tool is open): conversions are then checked against them.
pub fn collection_mapping(
    config: &Config,
    t: usize,
    i: usize,
    types: Option<&BTreeMap<String, FieldType>>,
) -> Result<Mapping, ConfigError> {
    let tool = &config.tools[t];
    let c = &tool.collections[i];
    let at = Place {
        config,
        prefix: format!("tool[{t}].collection[{i}]"),
        names: format!(
            "tool `{}`, collection `{}`",
            tool.name.get_ref(),
            c.name.get_ref()
        ),
    };
    let mut fields = Vec::new();
    if let Some(columns) = &c.columns {
        for column in columns.get_ref() {
            at.column_exists(columns.span(), "columns", column, types)?;
            fields.push(FieldMap::plain(column));
        }
    }
    for (k, f) in c.fields.iter().enumerate() {
        fields.push(field_map(&at, k, f, types)?);
    }
    at.no_twice(c, &fields)?;
    let filter = match &c.filter {
        Some(source) => Some(at.expr(source, "filter")?),
        None => None,
    };
    if let (Some(exit), None) = (&c.on_filter_exit, &filter) {
        return Err(at.invalid(
            exit.span(),
            "on_filter_exit",
            "applies to a collection with a `filter`".to_owned(),
        ));
    }
    let has_natural_key = config
        .collections
        .iter()
        .any(|s| s.name.get_ref() == c.name.get_ref() && s.natural_key.is_some());
    if let (Some(on_match), false) = (&c.on_match, has_natural_key) {
        return Err(at.invalid(
            on_match.span(),
            "on_match",
            format!(
                "applies to a collection with a natural key: add `natural_key` to the \
                 `[[collection]]` named `{}`",
                c.name.get_ref()
            ),
        ));
    }
    let changed_at = match &c.changed_at {
        None => None,
        Some(column) => {
            let found = fields
                .iter()
                .position(|f| f.column == *column.get_ref() && f.reads());
            if found.is_none() {
                return Err(at.invalid(
                    column.span(),
                    "changed_at",
                    format!(
                        "`{}` is not a column this collection reads (list it in `columns` \
                         or a `[[tool.collection.field]]` read from the tool)",
                        column.get_ref()
                    ),
                ));
            }
            found
        }
    };
    Ok(Mapping::new(
        fields,
        filter,
        c.on_filter_exit
            .as_ref()
            .map(|e| *e.get_ref())
            .unwrap_or_default(),
        c.on_match
            .as_ref()
            .map(|m| *m.get_ref())
            .unwrap_or_default(),
        changed_at,
    ))
}

/// The natural key of `collection`, if its `[[collection]]` entry names one.
pub fn natural_key(config: &Config, collection: &str) -> Result<Option<NaturalKey>, ConfigError> {
    let Some((s, shared)) = config
        .collections
        .iter()
        .enumerate()
        .find(|(_, s)| s.name.get_ref() == collection)
    else {
        return Ok(None);
    };
    let Some(key) = &shared.natural_key else {
        if let Some((field, steps)) = shared.normalize.iter().next() {
            return Err(config.invalid(
                steps.span(),
                format!("collection[{s}].normalize.{field}"),
                "`normalize` applies to the fields of a `natural_key`".to_owned(),
            ));
        }
        return Ok(None);
    };
    if key.get_ref().is_empty() {
        return Err(config.invalid(
            key.span(),
            format!("collection[{s}].natural_key"),
            "name at least one canonical field".to_owned(),
        ));
    }
    for (field, steps) in &shared.normalize {
        if !key.get_ref().contains(field) {
            return Err(config.invalid(
                steps.span(),
                format!("collection[{s}].normalize.{field}"),
                format!("`{field}` is not a field of the natural key"),
            ));
        }
    }
    let fields = key
        .get_ref()
        .iter()
        .map(|field| {
            let steps = shared
                .normalize
                .get(field)
                .map_or_else(|| NORMALIZE_DEFAULT.to_vec(), |s| s.get_ref().clone());
            (field.clone(), steps)
        })
        .collect();
    Ok(Some(NaturalKey::new(fields)))
}

/// Where in the configuration a collection's mapping is, for errors.
struct Place<'a> {
    config: &'a Config,
    prefix: String,
    names: String,
}

impl Place<'_> {
    fn invalid(&self, span: Range<usize>, key: &str, message: String) -> ConfigError {
        self.config.invalid(
            span,
            format!("{}.{key}", self.prefix),
            format!("{}: {message}", self.names),
        )
    }

    fn expr(&self, source: &Spanned<String>, key: &str) -> Result<Expr, ConfigError> {
        Expr::compile(source.get_ref()).map_err(|e| {
            self.invalid(
                source.span(),
                key,
                format!(
                    "the CEL expression `{}` does not compile: {e}",
                    source.get_ref()
                ),
            )
        })
    }

    fn column_exists(
        &self,
        span: Range<usize>,
        key: &str,
        column: &str,
        types: Option<&BTreeMap<String, FieldType>>,
    ) -> Result<(), ConfigError> {
        match types {
            Some(types) if !types.contains_key(column) => Err(self.invalid(
                span,
                key,
                format!("the table has no column `{column}` that Concord can sync"),
            )),
            _ => Ok(()),
        }
    }

    /// No column is configured twice, and no canonical field is read from two columns.
    fn no_twice(&self, c: &CollectionConfig, fields: &[FieldMap]) -> Result<(), ConfigError> {
        let mut columns = BTreeSet::new();
        let mut read = BTreeSet::new();
        for (n, f) in fields.iter().enumerate() {
            // Plain columns come first, then the `field` tables in order.
            let plain = c.columns.as_ref().map_or(0, |c| c.get_ref().len());
            let (span, key) = match n.checked_sub(plain) {
                Some(k) => (c.fields[k].column.span(), format!("field[{k}].column")),
                None => (
                    c.columns.as_ref().map_or(0..0, Spanned::span),
                    "columns".to_owned(),
                ),
            };
            if !columns.insert(f.column.as_str()) {
                return Err(self.invalid(
                    span,
                    &key,
                    format!("column `{}` is mapped twice", f.column),
                ));
            }
            if f.reads() && !read.insert(f.field.as_str()) {
                return Err(self.invalid(
                    span,
                    &key,
                    format!(
                        "field `{}` is read from two columns; read it from one and mark the \
                         others `direction = \"into_tool\"`",
                        f.field
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Compiles one `[[tool.collection.field]]`.
fn field_map(
    at: &Place<'_>,
    k: usize,
    f: &FieldConfig,
    types: Option<&BTreeMap<String, FieldType>>,
) -> Result<FieldMap, ConfigError> {
    let key = |name: &str| format!("field[{k}].{name}");
    let column = f.column.get_ref().clone();
    at.column_exists(f.column.span(), &key("column"), &column, types)?;
    let native = types.and_then(|t| t.get(&column).copied());
    let compute = match &f.compute {
        Some(source) => {
            if let Some(d) = f
                .direction
                .as_ref()
                .filter(|d| *d.get_ref() != Direction::IntoTool)
            {
                return Err(at.invalid(
                    d.span(),
                    &key("direction"),
                    "a computed column is only written into the tool (`into_tool`)".to_owned(),
                ));
            }
            Some(at.expr(source, &key("compute"))?)
        }
        None => None,
    };
    let direction = match (&compute, &f.direction) {
        (Some(_), _) => Direction::IntoTool,
        (None, Some(d)) => *d.get_ref(),
        (None, None) => Direction::Both,
    };
    // A key allowed only with a conversion, or refused.
    let only_with =
        |value: Option<Range<usize>>, name: &str, conversion: &str, ok: bool| match value {
            Some(span) if !ok => Err(at.invalid(
                span,
                &key(name),
                format!("`{name}` applies to `convert = \"{conversion}\"`"),
            )),
            _ => Ok(()),
        };
    let convert = f.convert.as_ref().map(|c| *c.get_ref());
    only_with(
        f.scale.as_ref().map(Spanned::span),
        "scale",
        "minor_units",
        convert == Some(Conversion::MinorUnits),
    )?;
    only_with(
        f.format.as_ref().map(Spanned::span),
        "format",
        "timestamp",
        convert == Some(Conversion::Timestamp),
    )?;
    for (value, name) in [
        (&f.true_value, "true_value"),
        (&f.false_value, "false_value"),
    ] {
        only_with(
            value.as_ref().map(Spanned::span),
            name,
            "bool",
            convert == Some(Conversion::Bool),
        )?;
    }
    // The column's type a conversion needs, checked when the schema is known.
    let needs = |wanted: &[FieldType], what: &str, span: Range<usize>, name: &str| match native {
        Some(found) if !wanted.contains(&found) => Err(at.invalid(
            span,
            &key(name),
            format!("column `{column}` is {found}, and this needs {what}"),
        )),
        _ => Ok(()),
    };
    let mut steps = Vec::new();
    if let Some(max) = &f.max_length {
        needs(&[FieldType::Text], "text", max.span(), "max_length")?;
        if *max.get_ref() == 0 {
            return Err(at.invalid(max.span(), &key("max_length"), "at least 1".to_owned()));
        }
        steps.push(Step::MaxLength(*max.get_ref()));
    }
    if let Some(case) = &f.case {
        needs(&[FieldType::Text], "text", case.span(), "case")?;
        steps.push(Step::Case(*case.get_ref()));
    }
    if let Some(trim) = &f.trim
        && *trim.get_ref()
    {
        needs(&[FieldType::Text], "text", trim.span(), "trim")?;
        steps.push(Step::Trim);
    }
    let zone = match &f.timezone {
        Some(name) => Some(name.get_ref().parse::<Tz>().map_err(|_| {
            at.invalid(
                name.span(),
                &key("timezone"),
                format!(
                    "`{}` is not an IANA time zone (e.g. \"Europe/Berlin\")",
                    name.get_ref()
                ),
            )
        })?),
        None => None,
    };
    if let Some(conversion) = &f.convert {
        let span = conversion.span();
        steps.push(match conversion.get_ref() {
            Conversion::MinorUnits => {
                needs(
                    &[FieldType::Integer],
                    "an integer column",
                    span.clone(),
                    "convert",
                )?;
                let scale = f.scale.as_ref().map_or(2, |s| *s.get_ref());
                if scale > 18 {
                    let span = f.scale.as_ref().map_or(span, Spanned::span);
                    return Err(at.invalid(span, &key("scale"), "at most 18 digits".to_owned()));
                }
                Step::MinorUnits { scale }
            }
            Conversion::Timestamp => {
                needs(&[FieldType::Text], "a text column", span.clone(), "convert")?;
                let format = f.format.as_ref().map(|f| f.get_ref().clone());
                if let (Some(text), Some(spanned)) = (&format, &f.format)
                    && !format_is_valid(text)
                {
                    return Err(at.invalid(
                        spanned.span(),
                        &key("format"),
                        format!("{text:?} is not a valid strftime format"),
                    ));
                }
                Step::TextTimestamp {
                    format,
                    zone: zone.unwrap_or(Tz::UTC),
                }
            }
            Conversion::Bool => {
                let text = native == Some(FieldType::Text);
                needs(
                    &[FieldType::Integer, FieldType::Text, FieldType::Bool],
                    "an integer, text or boolean column",
                    span.clone(),
                    "convert",
                )?;
                let pick =
                    |v: &Option<Spanned<toml::Value>>, name: &str, int: i64, word: &str| match v {
                        None if text => Ok(Value::Text(word.to_owned())),
                        None => Ok(Value::Int(int)),
                        Some(v) => match v.get_ref() {
                            toml::Value::String(s) => Ok(Value::Text(s.clone())),
                            toml::Value::Integer(i) => Ok(Value::Int(*i)),
                            toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
                            _ => Err(at.invalid(
                                v.span(),
                                &key(name),
                                "a text, an integer or a boolean".to_owned(),
                            )),
                        },
                    };
                let yes = pick(&f.true_value, "true_value", 1, "Y")?;
                let no = pick(&f.false_value, "false_value", 0, "N")?;
                if yes == no {
                    let span = f.false_value.as_ref().map_or(span, Spanned::span);
                    return Err(at.invalid(
                        span,
                        &key("false_value"),
                        "the true and false values must differ".to_owned(),
                    ));
                }
                Step::Bool { yes, no }
            }
            Conversion::Number => {
                needs(&[FieldType::Text], "a text column", span.clone(), "convert")?;
                Step::Number
            }
            Conversion::Text => {
                needs(
                    &[FieldType::Integer, FieldType::Float, FieldType::Decimal],
                    "a number column",
                    span.clone(),
                    "convert",
                )?;
                Step::Text(NumberKind::of(native))
            }
        });
    }
    match (&f.timezone, zone, convert) {
        (_, _, Some(Conversion::Timestamp)) | (None, _, _) => {}
        (Some(spanned), Some(zone), None) => {
            needs(
                &[FieldType::Timestamp],
                "a timestamp column",
                spanned.span(),
                "timezone",
            )?;
            steps.push(Step::WallClock { zone });
        }
        (Some(spanned), _, _) => {
            return Err(at.invalid(
                spanned.span(),
                &key("timezone"),
                "applies to a timestamp column or to `convert = \"timestamp\"`".to_owned(),
            ));
        }
    }
    if let Some(factor) = &f.factor {
        let exact = match factor.get_ref() {
            toml::Value::String(s) => Exact::from_str_exact(s.trim()).ok(),
            toml::Value::Integer(i) => Some(Exact::from(*i)),
            toml::Value::Float(x) => Exact::from_str_exact(&x.to_string()).ok(),
            _ => None,
        };
        let Some(exact) = exact.filter(|e| !e.is_zero()) else {
            return Err(at.invalid(
                factor.span(),
                &key("factor"),
                "a non-zero decimal number, such as \"1000\" or \"0.01\"".to_owned(),
            ));
        };
        if matches!(
            convert,
            Some(Conversion::Timestamp | Conversion::Bool | Conversion::Text)
        ) {
            return Err(at.invalid(
                factor.span(),
                &key("factor"),
                "applies to numbers, not to this conversion".to_owned(),
            ));
        }
        if convert.is_none() {
            needs(
                &[FieldType::Integer, FieldType::Float, FieldType::Decimal],
                "a number column",
                factor.span(),
                "factor",
            )?;
        }
        let kind = match convert {
            Some(_) => NumberKind::Decimal,
            None => NumberKind::of(native),
        };
        steps.push(Step::Factor(exact, kind));
    }
    if let Some(values) = &f.values {
        if convert.is_some() {
            return Err(at.invalid(
                values.span(),
                &key("values"),
                "an enumeration maps the column's own values: drop `convert`".to_owned(),
            ));
        }
        needs(
            &[FieldType::Text, FieldType::Integer],
            "a text or integer column",
            values.span(),
            "values",
        )?;
        let mut to_tool = BTreeMap::new();
        for (tool, field) in values.get_ref() {
            if let Some(other) = to_tool.insert(field.clone(), tool.clone()) {
                return Err(at.invalid(
                    values.span(),
                    &key("values"),
                    format!(
                        "`{other}` and `{tool}` both map to `{field}`: each field value needs \
                         one column value to be written back as"
                    ),
                ));
            }
        }
        steps.push(Step::Enum(EnumMap {
            to_field: values.get_ref().clone(),
            to_tool,
            default: f.default.as_ref().map(|d| d.get_ref().clone()),
            tool_default: f.tool_default.as_ref().map(|d| d.get_ref().clone()),
            integer: native == Some(FieldType::Integer),
        }));
    } else {
        for (value, name) in [(&f.default, "default"), (&f.tool_default, "tool_default")] {
            if let Some(v) = value {
                return Err(at.invalid(
                    v.span(),
                    &key(name),
                    "applies to an enumeration (`values`)".to_owned(),
                ));
            }
        }
    }
    Ok(FieldMap {
        field: f
            .field
            .as_ref()
            .map_or_else(|| column.clone(), |f| f.get_ref().clone()),
        column,
        direction,
        steps,
        compute,
    })
}
