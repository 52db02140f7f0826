//! Typed, tolerant reads of spec fields: a value of the wrong type is
//! recorded as a `malformed-spec` finding naming the field, and the rule
//! that asked sees the field as absent.

use std::cell::RefCell;

use serde_json::{Map, Value};

use super::{Finding, FindingId, Severity};

pub(super) struct SpecReader<'a> {
    root: &'a Value,
    malformed: RefCell<Vec<Finding>>,
}

pub(super) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> SpecReader<'a> {
    pub(super) fn new(root: &'a Value) -> Self {
        Self {
            root,
            malformed: RefCell::new(Vec::new()),
        }
    }

    pub(super) fn into_malformed(self) -> Vec<Finding> {
        let mut found = self.malformed.into_inner();
        // Two rules may read the same field: report it once.
        found.sort_by(|a, b| a.field.cmp(&b.field));
        found.dedup_by(|a, b| a.field == b.field);
        found
    }

    /// Records `field` as holding `value` where `expected` belongs.
    pub(super) fn malformed(&self, field: &str, value: &Value, expected: &str) {
        self.malformed.borrow_mut().push(Finding::new(
            FindingId::MalformedSpec,
            Severity::High,
            field,
            format!("{} where {expected} belongs", type_name(value)),
            "fix the spec: the runtime rejects or misreads this field",
        ));
    }

    /// The value at a dotted path; `null` counts as absent, as in the OCI
    /// spec's Go types.
    pub(super) fn get(&self, path: &str) -> Option<&'a Value> {
        let mut value = self.root;
        let mut walked = String::new();
        for key in path.split('.') {
            let object = self.as_object(&walked, value)?;
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(key);
            value = object.get(key)?;
            if value.is_null() {
                return None;
            }
        }
        Some(value)
    }

    fn as_object(&self, field: &str, value: &'a Value) -> Option<&'a Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            other => {
                self.malformed(
                    if field.is_empty() { "(spec)" } else { field },
                    other,
                    "an object",
                );
                None
            }
        }
    }

    pub(super) fn object(&self, path: &str) -> Option<&'a Map<String, Value>> {
        let value = self.get(path)?;
        self.as_object(path, value)
    }

    pub(super) fn array(&self, path: &str) -> Option<&'a [Value]> {
        match self.get(path)? {
            Value::Array(items) => Some(items),
            other => {
                self.malformed(path, other, "an array");
                None
            }
        }
    }

    pub(super) fn bool(&self, path: &str) -> Option<bool> {
        match self.get(path)? {
            Value::Bool(b) => Some(*b),
            other => {
                self.malformed(path, other, "a boolean");
                None
            }
        }
    }

    pub(super) fn str(&self, path: &str) -> Option<&'a str> {
        match self.get(path)? {
            Value::String(s) => Some(s),
            other => {
                self.malformed(path, other, "a string");
                None
            }
        }
    }

    /// An integer; a float, string or negative where unsigned is meant is malformed.
    pub(super) fn i64(&self, path: &str) -> Option<i64> {
        match self.get(path)? {
            Value::Number(n) if n.is_i64() => n.as_i64(),
            other => {
                self.malformed(path, other, "an integer");
                None
            }
        }
    }

    /// The strings of an array; elements of another type are malformed.
    pub(super) fn strings(&self, path: &str) -> Vec<&'a str> {
        let Some(items) = self.array(path) else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item {
                Value::String(s) => Some(s.as_str()),
                other => {
                    self.malformed(&format!("{path}[{i}]"), other, "a string");
                    None
                }
            })
            .collect()
    }

    /// Reads a field of one array element (`mounts[3].source`).
    pub(super) fn element_str(&self, path: &str, element: &'a Value, key: &str) -> Option<&'a str> {
        let Value::Object(map) = element else {
            self.malformed(path, element, "an object");
            return None;
        };
        match map.get(key)? {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => {
                self.malformed(&format!("{path}.{key}"), other, "a string");
                None
            }
        }
    }

    pub(super) fn element_strings(
        &self,
        path: &str,
        element: &'a Value,
        key: &str,
    ) -> Vec<&'a str> {
        let Value::Object(map) = element else {
            self.malformed(path, element, "an object");
            return Vec::new();
        };
        match map.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::String(s) => Some(s.as_str()),
                    other => {
                        self.malformed(&format!("{path}.{key}[{i}]"), other, "a string");
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.malformed(&format!("{path}.{key}"), other, "an array");
                Vec::new()
            }
        }
    }

    /// Any field of one array element, `null` counting as absent.
    pub(super) fn element(&self, path: &str, element: &'a Value, key: &str) -> Option<&'a Value> {
        let Value::Object(map) = element else {
            self.malformed(path, element, "an object");
            return None;
        };
        map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn element_bool(&self, path: &str, element: &'a Value, key: &str) -> Option<bool> {
        match self.element(path, element, key)? {
            Value::Bool(b) => Some(*b),
            other => {
                self.malformed(&format!("{path}.{key}"), other, "a boolean");
                None
            }
        }
    }
}
