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
    let column = f.column.get_ref().clone();
    at.column_exists(
        f.column.span(),
        &format!("field[{k}].column"),
        &column,
        types,
    )?;
    let field = FieldPlace {
        at,
        k,
        native: types.and_then(|t| t.get(&column).copied()),
        column,
    };
    let (compute, direction) = field.compute(f)?;
    field.conversion_keys(f)?;
    let mut steps = field.text_steps(f)?;
    let zone = field.zone(f)?;
    if let Some(conversion) = &f.convert {
        steps.push(field.conversion(f, conversion, zone)?);
    }
    steps.extend(field.wall_clock(f, zone)?);
    steps.extend(field.factor(f)?);
    steps.extend(field.enumeration(f)?);
    Ok(FieldMap {
        field: f
            .field
            .as_ref()
            .map_or_else(|| field.column.clone(), |f| f.get_ref().clone()),
        column: field.column,
        direction,
        steps,
        compute,
    })
}

/// One `[[tool.collection.field]]` being compiled: where it is, and its column.
struct FieldPlace<'a> {
    at: &'a Place<'a>,
    k: usize,
    column: String,
    /// The column's type, when the schema is known.
    native: Option<FieldType>,
}

impl FieldPlace<'_> {
    fn invalid(&self, span: Range<usize>, name: &str, message: String) -> ConfigError {
        self.at
            .invalid(span, &format!("field[{}].{name}", self.k), message)
    }

    /// Refuses a column whose known type is not among `wanted` (`what` says them).
    fn needs(
        &self,
        wanted: &[FieldType],
        what: &str,
        span: Range<usize>,
        name: &str,
    ) -> Result<(), ConfigError> {
        match self.native {
            Some(found) if !wanted.contains(&found) => Err(self.invalid(
                span,
                name,
                format!("column `{}` is {found}, and this needs {what}", self.column),
            )),
            _ => Ok(()),
        }
    }

    /// The computed column's expression, and the field's direction.
    fn compute(&self, f: &FieldConfig) -> Result<(Option<Expr>, Direction), ConfigError> {
        let Some(source) = &f.compute else {
            return Ok((
                None,
                f.direction
                    .as_ref()
                    .map_or(Direction::Both, |d| *d.get_ref()),
            ));
        };
        if let Some(d) = f
            .direction
            .as_ref()
            .filter(|d| *d.get_ref() != Direction::IntoTool)
        {
            return Err(self.invalid(
                d.span(),
                "direction",
                "a computed column is only written into the tool (`into_tool`)".to_owned(),
            ));
        }
        let expr = self
            .at
            .expr(source, &format!("field[{}].compute", self.k))?;
        Ok((Some(expr), Direction::IntoTool))
    }

    /// Keys that belong to one conversion are refused with any other.
    fn conversion_keys(&self, f: &FieldConfig) -> Result<(), ConfigError> {
        let convert = f.convert.as_ref().map(|c| *c.get_ref());
        let keys = [
            (
                f.scale.as_ref().map(Spanned::span),
                "scale",
                Conversion::MinorUnits,
                "minor_units",
            ),
            (
                f.format.as_ref().map(Spanned::span),
                "format",
                Conversion::Timestamp,
                "timestamp",
            ),
            (
                f.true_value.as_ref().map(Spanned::span),
                "true_value",
                Conversion::Bool,
                "bool",
            ),
            (
                f.false_value.as_ref().map(Spanned::span),
                "false_value",
                Conversion::Bool,
                "bool",
            ),
        ];
        for (span, name, conversion, spelled) in keys {
            if let Some(span) = span
                && convert != Some(conversion)
            {
                return Err(self.invalid(
                    span,
                    name,
                    format!("`{name}` applies to `convert = \"{spelled}\"`"),
                ));
            }
        }
        Ok(())
    }

    /// `max_length`, `case` and `trim`, which shape text on the tool's side.
    fn text_steps(&self, f: &FieldConfig) -> Result<Vec<Step>, ConfigError> {
        let mut steps = Vec::new();
        if let Some(max) = &f.max_length {
            self.needs(&[FieldType::Text], "text", max.span(), "max_length")?;
            if *max.get_ref() == 0 {
                return Err(self.invalid(max.span(), "max_length", "at least 1".to_owned()));
            }
            steps.push(Step::MaxLength(*max.get_ref()));
        }
        if let Some(case) = &f.case {
            self.needs(&[FieldType::Text], "text", case.span(), "case")?;
            steps.push(Step::Case(*case.get_ref()));
        }
        if let Some(trim) = f.trim.as_ref().filter(|t| *t.get_ref()) {
            self.needs(&[FieldType::Text], "text", trim.span(), "trim")?;
            steps.push(Step::Trim);
        }
        Ok(steps)
    }

    fn zone(&self, f: &FieldConfig) -> Result<Option<Tz>, ConfigError> {
        let Some(name) = &f.timezone else {
            return Ok(None);
        };
        name.get_ref().parse::<Tz>().map(Some).map_err(|_| {
            self.invalid(
                name.span(),
                "timezone",
                format!(
                    "`{}` is not an IANA time zone (e.g. \"Europe/Berlin\")",
                    name.get_ref()
                ),
            )
        })
    }

    /// The step of `convert`, checked against the column's type.
    fn conversion(
        &self,
        f: &FieldConfig,
        conversion: &Spanned<Conversion>,
        zone: Option<Tz>,
    ) -> Result<Step, ConfigError> {
        let span = conversion.span();
        let needs =
            |wanted: &[FieldType], what: &str| self.needs(wanted, what, span.clone(), "convert");
        match conversion.get_ref() {
            Conversion::MinorUnits => {
                needs(&[FieldType::Integer], "an integer column")?;
                let scale = f.scale.as_ref().map_or(2, |s| *s.get_ref());
                if scale > MINOR_UNITS_SCALE_MAX {
                    let span = f.scale.as_ref().map_or(span.clone(), Spanned::span);
                    let message = format!("at most {MINOR_UNITS_SCALE_MAX} digits");
                    return Err(self.invalid(span, "scale", message));
                }
                Ok(Step::MinorUnits { scale })
            }
            Conversion::Timestamp => {
                needs(&[FieldType::Text], "a text column")?;
                if let Some(format) = f.format.as_ref().filter(|f| !format_is_valid(f.get_ref())) {
                    let message = format!("{:?} is not a valid strftime format", format.get_ref());
                    return Err(self.invalid(format.span(), "format", message));
                }
                Ok(Step::TextTimestamp {
                    format: f.format.as_ref().map(|f| f.get_ref().clone()),
                    zone: zone.unwrap_or(Tz::UTC),
                })
            }
            Conversion::Bool => {
                let kinds = [FieldType::Integer, FieldType::Text, FieldType::Bool];
                needs(&kinds, "an integer, text or boolean column")?;
                self.bool_step(f, span.clone())
            }
            Conversion::Number => {
                needs(&[FieldType::Text], "a text column")?;
                Ok(Step::Number)
            }
            Conversion::Text => {
                let kinds = [FieldType::Integer, FieldType::Float, FieldType::Decimal];
                needs(&kinds, "a number column")?;
                Ok(Step::Text(NumberKind::of(self.native)))
            }
        }
    }

    /// `convert = "bool"`: the column's two values (1/0, or "Y"/"N" for text).
    fn bool_step(&self, f: &FieldConfig, span: Range<usize>) -> Result<Step, ConfigError> {
        let text = self.native == Some(FieldType::Text);
        let pick = |v: &Option<Spanned<toml::Value>>, name: &str, int: i64, word: &str| match v {
            None if text => Ok(Value::Text(word.to_owned())),
            None => Ok(Value::Int(int)),
            Some(v) => match v.get_ref() {
                toml::Value::String(s) => Ok(Value::Text(s.clone())),
                toml::Value::Integer(i) => Ok(Value::Int(*i)),
                toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
                _ => {
                    Err(self.invalid(v.span(), name, "a text, an integer or a boolean".to_owned()))
                }
            },
        };
        let yes = pick(&f.true_value, "true_value", 1, "Y")?;
        let no = pick(&f.false_value, "false_value", 0, "N")?;
        if yes == no {
            let span = f.false_value.as_ref().map_or(span, Spanned::span);
            let message = "the true and false values must differ".to_owned();
            return Err(self.invalid(span, "false_value", message));
        }
        Ok(Step::Bool { yes, no })
    }

    /// `timezone` without `convert`: a timestamp column holding wall-clock time.
    fn wall_clock(&self, f: &FieldConfig, zone: Option<Tz>) -> Result<Option<Step>, ConfigError> {
        let (Some(spanned), Some(zone)) = (&f.timezone, zone) else {
            return Ok(None);
        };
        match f.convert.as_ref().map(|c| *c.get_ref()) {
            Some(Conversion::Timestamp) => Ok(None),
            None => {
                let kinds = [FieldType::Timestamp];
                self.needs(&kinds, "a timestamp column", spanned.span(), "timezone")?;
                Ok(Some(Step::WallClock { zone }))
            }
            Some(_) => Err(self.invalid(
                spanned.span(),
                "timezone",
                "applies to a timestamp column or to `convert = \"timestamp\"`".to_owned(),
            )),
        }
    }

    /// `factor`: units, for numbers.
    fn factor(&self, f: &FieldConfig) -> Result<Option<Step>, ConfigError> {
        let Some(factor) = &f.factor else {
            return Ok(None);
        };
        let exact = match factor.get_ref() {
            toml::Value::String(s) => Exact::from_str_exact(s.trim()).ok(),
            toml::Value::Integer(i) => Some(Exact::from(*i)),
            toml::Value::Float(x) => Exact::from_str_exact(&x.to_string()).ok(),
            _ => None,
        };
        let Some(exact) = exact.filter(|e| !e.is_zero()) else {
            let message = "a non-zero decimal number, such as \"1000\" or \"0.01\"".to_owned();
            return Err(self.invalid(factor.span(), "factor", message));
        };
        let convert = f.convert.as_ref().map(|c| *c.get_ref());
        let kind = match convert {
            None => {
                let kinds = [FieldType::Integer, FieldType::Float, FieldType::Decimal];
                self.needs(&kinds, "a number column", factor.span(), "factor")?;
                NumberKind::of(self.native)
            }
            Some(Conversion::MinorUnits | Conversion::Number) => NumberKind::Decimal,
            Some(_) => {
                let message = "applies to numbers, not to this conversion".to_owned();
                return Err(self.invalid(factor.span(), "factor", message));
            }
        };
        Ok(Some(Step::Factor(exact, kind)))
    }

    /// `values`, `default` and `tool_default`: an enumeration.
    fn enumeration(&self, f: &FieldConfig) -> Result<Option<Step>, ConfigError> {
        let Some(values) = &f.values else {
            for (value, name) in [(&f.default, "default"), (&f.tool_default, "tool_default")] {
                if let Some(v) = value {
                    let message = "applies to an enumeration (`values`)".to_owned();
                    return Err(self.invalid(v.span(), name, message));
                }
            }
            return Ok(None);
        };
        if f.convert.is_some() {
            let message = "an enumeration maps the column's own values: drop `convert`".to_owned();
            return Err(self.invalid(values.span(), "values", message));
        }
        let kinds = [FieldType::Text, FieldType::Integer];
        self.needs(&kinds, "a text or integer column", values.span(), "values")?;
        let mut to_tool = BTreeMap::new();
        for (tool, field) in values.get_ref() {
            if let Some(other) = to_tool.insert(field.clone(), tool.clone()) {
                let message = format!(
                    "`{other}` and `{tool}` both map to `{field}`: each field value needs one \
                     column value to be written back as"
                );
                return Err(self.invalid(values.span(), "values", message));
            }
        }
        Ok(Some(Step::Enum(EnumMap {
            to_field: values.get_ref().clone(),
            to_tool,
            default: f.default.as_ref().map(|d| d.get_ref().clone()),
            tool_default: f.tool_default.as_ref().map(|d| d.get_ref().clone()),
            integer: self.native == Some(FieldType::Integer),
        })))
    }
}

/// The most decimal places `minor_units` takes (10^18 still fits an integer).
const MINOR_UNITS_SCALE_MAX: u32 = 18;
