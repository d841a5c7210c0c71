//! Daytona's API descriptions, loaded at run time from the official spec files
//! (committed verbatim under `tests/specs/daytona`, see its README for their
//! provenance and licences), normalised so that both the OpenAPI 3.0 main
//! API and the Swagger 2.0 toolbox look alike: operations with parameters,
//! bodies and responses whose schemas are JSON Schema draft 4 with `$ref`s
//! into `#/definitions/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

/// Where the specs are: `$SHOAL_DAYTONA_SPECS` when set (an override, e.g.
/// `../shared/specs/daytona`), else the copies committed in this repository
/// (`<repo>/tests/specs/daytona`), so a clone in any folder can run the tests.
pub fn specs_dir() -> PathBuf {
    match std::env::var_os("SHOAL_DAYTONA_SPECS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/daytona"),
    }
}

/// Where a parameter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
    Header,
    FormData,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub location: In,
    pub required: bool,
    pub schema: Value,
    /// OpenAPI `explode` (arrays in the query).
    pub explode: bool,
    /// Swagger `type: file` (a multipart file part).
    pub file: bool,
}

#[derive(Debug, Clone)]
pub struct BodySpec {
    pub required: bool,
    pub media_types: Vec<String>,
    pub schema: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct ResponseSpec {
    /// Media types the body may have; empty when no body is described.
    pub media_types: Vec<String>,
    /// JSON schema of the body; `None` for no body or a file.
    pub schema: Option<Value>,
    pub file: bool,
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub method: String,
    pub template: String,
    pub params: Vec<Param>,
    pub body: Option<BodySpec>,
    pub responses: BTreeMap<String, ResponseSpec>,
}

impl Operation {
    /// Path parameters when `path` matches this operation's template.
    fn matches(&self, path: &str) -> Option<(usize, HashMap<String, String>)> {
        let wanted: Vec<&str> = self.template.trim_matches('/').split('/').collect();
        let got: Vec<&str> = path.trim_matches('/').split('/').collect();
        if wanted.len() != got.len() {
            return None;
        }
        let mut literal = 0;
        let mut params = HashMap::new();
        for (w, g) in wanted.iter().zip(&got) {
            if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                if g.is_empty() {
                    return None;
                }
                let decoded = percent_decode(g);
                params.insert(name.to_owned(), decoded);
            } else if w == g {
                literal += 1;
            } else {
                return None;
            }
        }
        Some((literal, params))
    }
}

fn percent_decode(text: &str) -> String {
    let url = format!("http://x/?v={}", text.replace('+', "%2B"));
    reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.query_pairs().next().map(|(_, v)| v.into_owned()))
        .unwrap_or_else(|| text.to_owned())
}

/// One API.
pub struct Spec {
    pub name: &'static str,
    pub operations: Vec<Operation>,
    definitions: Map<String, Value>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl Spec {
    /// Loads the main API (`api/openapi.yaml`) and the toolbox
    /// (`toolbox/swagger.json`) from `dir`. Panics with a clear message when
    /// they are missing: the Daytona tests must fail, not skip.
    pub fn load_both(dir: &Path) -> (Spec, Spec) {
        let main = dir.join("api/openapi.yaml");
        let toolbox = dir.join("toolbox/swagger.json");
        for file in [&main, &toolbox] {
            assert!(
                file.is_file(),
                "Daytona spec {} is missing. The Daytona tests validate against Daytona's \
                 official OpenAPI specs, read from <repo>/tests/specs/daytona or from \
                 $SHOAL_DAYTONA_SPECS; provide them there.",
                file.display()
            );
        }
        let text = std::fs::read_to_string(&main)
            .unwrap_or_else(|e| panic!("reading {}: {e}", main.display()));
        let doc: Value = yaml_serde::from_str(&text)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", main.display()));
        let main = Spec::from_openapi3("daytona-api", &doc);
        let text = std::fs::read_to_string(&toolbox)
            .unwrap_or_else(|e| panic!("reading {}: {e}", toolbox.display()));
        let doc: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", toolbox.display()));
        let toolbox = Spec::from_swagger2("daytona-toolbox", &doc);
        (main, toolbox)
    }

    fn from_openapi3(name: &'static str, doc: &Value) -> Spec {
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "{name}: not an OpenAPI 3 document"
        );
        let definitions = doc["components"]["schemas"]
            .as_object()
            .map(|schemas| {
                schemas
                    .iter()
                    .map(|(k, v)| (k.clone(), convert(v)))
                    .collect()
            })
            .unwrap_or_default();
        let mut operations = Vec::new();
        for (template, item) in doc["paths"].as_object().into_iter().flatten() {
            let shared = item["parameters"].as_array().cloned().unwrap_or_default();
            for (method, op) in item.as_object().into_iter().flatten() {
                if !is_method(method) {
                    continue;
                }
                let params = shared
                    .iter()
                    .chain(op["parameters"].as_array().into_iter().flatten())
                    .filter_map(|p| {
                        let location = match p["in"].as_str()? {
                            "path" => In::Path,
                            "query" => In::Query,
                            "header" => In::Header,
                            _ => return None,
                        };
                        Some(Param {
                            name: p["name"].as_str()?.to_owned(),
                            location,
                            required: p["required"].as_bool().unwrap_or(location == In::Path),
                            schema: convert(&p["schema"]),
                            explode: p["explode"].as_bool().unwrap_or(true),
                            file: false,
                        })
                    })
                    .collect();
                let body = op.get("requestBody").map(|rb| BodySpec {
                    required: rb["required"].as_bool().unwrap_or(false),
                    media_types: keys(&rb["content"]),
                    schema: rb["content"]["application/json"].get("schema").map(convert),
                });
                let responses = op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(code, r)| {
                        let json_schema = r["content"]["application/json"].get("schema");
                        (
                            code.clone(),
                            ResponseSpec {
                                media_types: keys(&r["content"]),
                                schema: json_schema.map(convert),
                                file: false,
                            },
                        )
                    })
                    .collect();
                operations.push(Operation {
                    id: op["operationId"].as_str().unwrap_or(template).to_owned(),
                    method: method.to_uppercase(),
                    template: template.clone(),
                    params,
                    body,
                    responses,
                });
            }
        }
        Spec::new(name, operations, definitions)
    }

    fn from_swagger2(name: &'static str, doc: &Value) -> Spec {
        assert_eq!(doc["swagger"], "2.0", "{name}: not a Swagger 2.0 document");
        let definitions = doc["definitions"]
            .as_object()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), convert(v))).collect())
            .unwrap_or_default();
        let global_consumes = strings(&doc["consumes"]);
        let global_produces = strings(&doc["produces"]);
        let mut operations = Vec::new();
        for (template, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                if !is_method(method) {
                    continue;
                }
                let consumes = op
                    .get("consumes")
                    .map(strings)
                    .unwrap_or_else(|| global_consumes.clone());
                let produces = op
                    .get("produces")
                    .map(strings)
                    .unwrap_or_else(|| global_produces.clone());
                let mut params = Vec::new();
                let mut body = None;
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let required = p["required"].as_bool().unwrap_or(false);
                    let location = match p["in"].as_str().unwrap_or_default() {
                        "body" => {
                            body = Some(BodySpec {
                                required,
                                media_types: consumes.clone(),
                                schema: p.get("schema").map(convert),
                            });
                            continue;
                        }
                        "path" => In::Path,
                        "query" => In::Query,
                        "header" => In::Header,
                        "formData" => In::FormData,
                        _ => continue,
                    };
                    let mut schema = Map::new();
                    for key in [
                        "type",
                        "items",
                        "enum",
                        "format",
                        "minimum",
                        "maximum",
                        "pattern",
                        "minLength",
                        "maxLength",
                    ] {
                        if let Some(value) = p.get(key) {
                            schema.insert(key.to_owned(), value.clone());
                        }
                    }
                    let file = p["type"] == "file";
                    if file {
                        schema.clear();
                    }
                    params.push(Param {
                        name: p["name"].as_str().unwrap_or_default().to_owned(),
                        location,
                        required: required || location == In::Path,
                        schema: convert(&Value::Object(schema)),
                        explode: p["collectionFormat"] == "multi",
                        file,
                    });
                }
                if body.is_none() && params.iter().any(|p| p.location == In::FormData) {
                    body = Some(BodySpec {
                        required: true,
                        media_types: consumes.clone(),
                        schema: None,
                    });
                }
                let responses = op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(code, r)| {
                        let file = r["schema"]["type"] == "file";
                        let schema = r.get("schema").filter(|_| !file).map(convert);
                        // swaggo leaves `produces` out where gin answers JSON.
                        let media_types = match (schema.is_some() || file, produces.is_empty()) {
                            (false, _) => Vec::new(),
                            (true, false) => produces.clone(),
                            (true, true) => vec!["application/json".to_owned()],
                        };
                        (
                            code.clone(),
                            ResponseSpec {
                                media_types,
                                schema,
                                file,
                            },
                        )
                    })
                    .collect();
                operations.push(Operation {
                    id: op["operationId"].as_str().unwrap_or(template).to_owned(),
                    method: method.to_uppercase(),
                    template: template.clone(),
                    params,
                    body,
                    responses,
                });
            }
        }
        Spec::new(name, operations, definitions)
    }

    fn new(
        name: &'static str,
        operations: Vec<Operation>,
        definitions: Map<String, Value>,
    ) -> Spec {
        assert!(!operations.is_empty(), "{name}: no operations found");
        Spec {
            name,
            operations,
            definitions,
            validators: Mutex::new(HashMap::new()),
        }
    }

    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.operations.iter().find(|op| op.id == id)
    }

    /// The operation `method path` calls, with its path parameters; literal
    /// segments win over parameters (`/sandbox/paginated`).
    pub fn find(&self, method: &str, path: &str) -> Option<(&Operation, HashMap<String, String>)> {
        self.operations
            .iter()
            .filter(|op| op.method == method)
            .filter_map(|op| op.matches(path).map(|(score, params)| (score, op, params)))
            .max_by_key(|(score, _, _)| *score)
            .map(|(_, op, params)| (op, params))
    }

    /// Checks `instance` against `schema`; the problems found.
    pub fn check(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let key = schema.to_string();
        let validator = {
            let mut cache = self.validators.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(validator) = cache.get(&key) {
                validator.clone()
            } else {
                let root = self.root_for(schema);
                match jsonschema::draft4::options()
                    .should_validate_formats(true)
                    .build(&root)
                {
                    Ok(validator) => {
                        let validator = Arc::new(validator);
                        cache.insert(key, validator.clone());
                        validator
                    }
                    Err(error) => return vec![format!("spec schema does not compile: {error}")],
                }
            }
        };
        validator
            .iter_errors(instance)
            .map(|error| format!("{} at {:?}", error, error.instance_path().as_str()))
            .collect()
    }

    /// `schema` with the definitions it reaches, as one draft 4 document.
    fn root_for(&self, schema: &Value) -> Value {
        let mut reached = BTreeSet::new();
        let mut todo = vec![schema.clone()];
        while let Some(next) = todo.pop() {
            for name in refs(&next) {
                if reached.insert(name.clone()) {
                    if let Some(definition) = self.definitions.get(&name) {
                        todo.push(definition.clone());
                    }
                }
            }
        }
        let definitions: Map<String, Value> = reached
            .into_iter()
            .filter_map(|name| Some((name.clone(), self.definitions.get(&name)?.clone())))
            .collect();
        json!({ "allOf": [schema], "definitions": definitions })
    }
}

fn is_method(method: &str) -> bool {
    matches!(
        method,
        "get" | "put" | "post" | "delete" | "patch" | "head" | "options"
    )
}

fn keys(value: &Value) -> Vec<String> {
    value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the definitions `schema` refers to directly.
fn refs(schema: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![schema];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                if let Some(target) = map.get("$ref").and_then(Value::as_str) {
                    if let Some(name) = target.strip_prefix("#/definitions/") {
                        found.push(name.to_owned());
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

/// OpenAPI 3.0 / Swagger 2.0 schema → JSON Schema draft 4: `$ref`s point into
/// `#/definitions/`, and `nullable: true` admits `null`. Other OpenAPI-only
/// keywords (`example`, `x-*`, `discriminator`, ...) are ignored by
/// validators anyway.
fn convert(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                match key.as_str() {
                    "$ref" => {
                        let target = value.as_str().unwrap_or_default();
                        let name = target
                            .strip_prefix("#/components/schemas/")
                            .or_else(|| target.strip_prefix("#/definitions/"))
                            .unwrap_or(target);
                        out.insert(key.clone(), Value::String(format!("#/definitions/{name}")));
                    }
                    "example" | "examples" | "nullable" | "discriminator" | "xml" => {}
                    // `properties` maps names to schemas; convert each one.
                    "properties" | "definitions" => {
                        let converted = value
                            .as_object()
                            .map(|m| m.iter().map(|(k, v)| (k.clone(), convert(v))).collect())
                            .unwrap_or_default();
                        out.insert(key.clone(), Value::Object(converted));
                    }
                    _ => {
                        out.insert(key.clone(), convert(value));
                    }
                }
            }
            if map.get("nullable") == Some(&Value::Bool(true)) {
                return nullable(out);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(convert).collect()),
        other => other.clone(),
    }
}

fn nullable(mut schema: Map<String, Value>) -> Value {
    match schema.get("type").cloned() {
        Some(Value::String(t)) if !schema.contains_key("$ref") => {
            schema.insert("type".into(), json!([t, "null"]));
            if let Some(Value::Array(values)) = schema.get_mut("enum") {
                values.push(Value::Null);
            }
            Value::Object(schema)
        }
        _ => json!({ "anyOf": [Value::Object(schema), { "type": "null" }] }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_and_refs_are_converted() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": { "type": "string", "nullable": true, "example": "x" },
                "b": { "$ref": "#/components/schemas/B" }
            }
        });
        let converted = convert(&schema);
        assert_eq!(
            converted["properties"]["a"]["type"],
            json!(["string", "null"])
        );
        assert!(converted["properties"]["a"].get("example").is_none());
        assert_eq!(converted["properties"]["b"]["$ref"], "#/definitions/B");
    }
}
