use super::*;

/// A tiny `/object_info` with one node of each kind the cases need.
fn defs() -> NodeDefs {
    NodeDefs::from_object_info(&json!({
        "Number": {
            "input": {"required": {"value": ["INT", {"default": 1, "min": 0, "max": 100}]}},
            "output": ["INT"], "output_node": false
        },
        "Text": {
            "input": {"required": {"text": ["STRING", {"multiline": true}]}},
            "output": ["STRING"], "output_node": false
        },
        "Sampler": {
            "input": {
                "required": {
                    "seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615u64}],
                    "cfg": ["FLOAT", {"default": 3.5, "min": 0.0, "max": 10.0}],
                    "sampler": [["euler", "heun"], {"default": "euler"}],
                    "prompt": ["STRING", {"default": ""}],
                    "tiled": ["BOOLEAN", {"default": false}]
                },
                "optional": {"loras": ["LORAS", {}], "anything": ["*", {}]},
                "hidden": {"unique_id": "UNIQUE_ID"}
            },
            "input_order": {
                "required": ["seed", "cfg", "sampler", "prompt", "tiled"],
                "optional": ["loras", "anything"]
            },
            "output": ["IMAGE", "LATENT"], "output_node": false
        },
        "Lora": {
            "input": {
                "required": {
                    "name": [["a.safetensors", "b.safetensors"], {}],
                    "strength": ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0}]
                },
                "optional": {"loras": ["LORAS", {}]}
            },
            "output": ["LORAS"], "output_node": false
        },
        "Save": {
            "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
            "output": [], "output_node": true
        },
        "Preview": {
            "input": {"required": {"images": ["IMAGE,MASK", {}]}},
            "output": [], "output_node": true
        },
        "Pass": {
            "input": {"required": {"image": ["IMAGE", {}]}},
            "output": ["IMAGE"], "output_node": false
        },
        "Anything": {"input": {"required": {}}, "output": ["*"], "output_node": false},
        "ListFiles": {"input": {}, "output": [["a.safetensors", "b.safetensors"]], "output_node": false},
        "PickFile": {
            "input": {"required": {"file": [["a.safetensors", "b.safetensors"], {}]}},
            "output": [], "output_node": true
        },
        "PickCombo": {
            "input": {"required": {
                "file": ["COMBO", {"options": ["x", "y"]}],
                "tags": ["COMBO", {"options": ["p", "q", "r"], "multiselect": true}],
                "remote": ["COMBO", {"remote_combo": {"route": "/x"}}]
            }},
            "output": [], "output_node": true
        },
        "Big": {
            "input": {"required": {"choice": [(0..25).map(|i| format!("o{i}")).collect::<Vec<_>>(), {}]}},
            "output": [], "output_node": true
        },
        "Rate": {
            "input": {"required": {"lr": ["FLOAT", {"min": 0.0000001, "max": 10.0}]}},
            "output": [], "output_node": true
        },
        "Loop": {
            "input": {"required": {"a": ["IMAGE", {}]}, "optional": {"b": ["IMAGE", {}]}},
            "output": ["IMAGE"], "output_node": false
        }
    }))
}

fn sampler(seed: Value) -> Value {
    json!({"class_type": "Sampler", "inputs": {
        "seed": seed, "cfg": 3.5, "sampler": "euler", "prompt": "a cat", "tiled": false
    }})
}

/// Sampler "1" → Save "2".
fn simple() -> Value {
    json!({
        "1": sampler(json!(7)),
        "2": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "out"}}
    })
}

fn run(prompt: &Value) -> Result<Validated, PromptError> {
    validate(prompt, &defs(), None)
}

fn rejected(prompt: &Value) -> PromptError {
    match run(prompt) {
        Ok(v) => panic!("expected a rejection, got {v:#?}"),
        Err(e) => e,
    }
}

/// The single error on `node` of a rejected prompt.
fn node_error(prompt: &Value, node: &str) -> ErrorInfo {
    let err = rejected(prompt);
    assert_eq!(
        err.error.kind,
        ErrorKind::PromptOutputsFailedValidation,
        "{err:#?}"
    );
    let entry = err
        .node_errors
        .get(node)
        .unwrap_or_else(|| panic!("no errors on {node}: {err:#?}"));
    assert_eq!(entry.errors.len(), 1, "{:#?}", entry.errors);
    entry.errors[0].clone()
}

fn with_input(mut prompt: Value, node: &str, input: &str, value: Value) -> Value {
    prompt[node]["inputs"][input] = value;
    prompt
}

fn without_input(mut prompt: Value, node: &str, input: &str) -> Value {
    prompt[node]["inputs"]
        .as_object_mut()
        .unwrap()
        .remove(input);
    prompt
}

// --- accepted prompts --------------------------------------------------------

#[test]
fn a_valid_prompt_gives_the_needed_nodes_with_converted_constants() {
    let prompt = json!({
        "1": {"class_type": "Sampler", "_meta": {"title": "My sampler"}, "inputs": {
            "seed": "42", "cfg": 3, "sampler": "heun", "prompt": 5, "tiled": 1,
            "not_declared": "ignored", "unique_id": "hidden inputs are not prompt inputs"
        }},
        "2": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "out"}},
        "9": {"class_type": "Text", "inputs": {"text": ["nowhere", 0]}}
    });
    let validated = run(&prompt).unwrap();
    assert!(validated.node_errors.is_empty());
    let graph = validated.graph;
    assert_eq!(graph.outputs(), ["2".to_string()]);
    // "9" is reached by no output: not checked, not part of the graph.
    assert!(graph.node("9").is_none());
    let node = graph.node("1").unwrap();
    assert_eq!(node.title.as_deref(), Some("My sampler"));
    assert!(!node.output_node);
    assert!(graph.node("2").unwrap().output_node);
    let value = |name: &str| match &node.inputs[name] {
        Input::Value(v) => v.clone(),
        Input::Link(l) => panic!("{name} is a link {l:?}"),
    };
    assert_eq!(value("seed"), json!(42));
    assert!(value("cfg").is_f64());
    assert_eq!(value("cfg"), json!(3.0));
    assert_eq!(value("sampler"), json!("heun"));
    assert_eq!(value("prompt"), json!("5"));
    assert_eq!(value("tiled"), json!(true));
    assert_eq!(
        node.inputs.len(),
        5,
        "undeclared and hidden inputs are dropped"
    );
    assert_eq!(
        graph.node("2").unwrap().links().collect::<Vec<_>>(),
        vec![(
            "images",
            &Link {
                node: "1".into(),
                output: 0
            }
        )]
    );
}

#[test]
fn optional_inputs_may_be_absent_and_any_type_links_are_accepted() {
    let mut prompt = simple();
    prompt["3"] = json!({"class_type": "Anything", "inputs": {}});
    prompt["1"]["inputs"]["anything"] = json!(["3", 0]);
    // "*" output into an IMAGE input, and a typed output into a "*" input.
    prompt["4"] =
        json!({"class_type": "Save", "inputs": {"images": ["3", 0], "filename_prefix": "x"}});
    let validated = run(&prompt).unwrap();
    assert_eq!(
        validated.graph.outputs(),
        ["2".to_string(), "4".to_string()]
    );
}

#[test]
fn a_union_input_type_accepts_any_of_its_types() {
    let prompt = json!({
        "1": sampler(json!(1)),
        "2": {"class_type": "Preview", "inputs": {"images": ["1", 0]}}
    });
    assert!(run(&prompt).is_ok());
}

#[test]
fn a_list_output_feeds_a_combo_input_with_the_same_list() {
    let prompt = json!({
        "1": {"class_type": "ListFiles", "inputs": {}},
        "2": {"class_type": "PickFile", "inputs": {"file": ["1", 0]}}
    });
    assert!(run(&prompt).is_ok());
}

#[test]
fn a_combo_value_may_come_wrapped_in_value_and_multiselect_takes_lists() {
    let prompt = json!({"1": {"class_type": "PickCombo", "inputs": {
        "file": {"__value__": "y"}, "tags": {"__value__": ["p", "r"]}, "remote": "anything goes"
    }}});
    let graph = run(&prompt).unwrap().graph;
    assert_eq!(
        graph.node("1").unwrap().inputs["tags"],
        Input::Value(json!(["p", "r"]))
    );
}

#[test]
fn ints_convert_as_python_int_does() {
    for (given, expected) in [
        (json!(7), json!(7)),
        (json!(7.9), json!(7)),
        (json!(" 12 "), json!(12)),
        (json!("1_000"), json!(1000)),
        (json!(true), json!(1)),
        (
            json!(18446744073709551615u64),
            json!(18446744073709551615u64),
        ),
    ] {
        let graph = run(&with_input(simple(), "1", "seed", given.clone()))
            .unwrap()
            .graph;
        assert_eq!(
            graph.node("1").unwrap().inputs["seed"],
            Input::Value(expected),
            "{given}"
        );
    }
}

#[test]
fn partial_execution_targets_pick_the_outputs() {
    let mut prompt = simple();
    prompt["3"] =
        json!({"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "b"}});
    let targets = vec!["3".to_string()];
    let graph = validate(&prompt, &defs(), Some(&targets)).unwrap().graph;
    assert_eq!(graph.outputs(), ["3".to_string()]);
    let none = validate(&prompt, &defs(), Some(&["1".to_string()][..])).unwrap_err();
    assert_eq!(none.error.kind, ErrorKind::PromptNoOutputs);
}

// --- whole-prompt errors -----------------------------------------------------

#[test]
fn a_prompt_that_is_not_an_object_is_invalid() {
    let err = rejected(&json!([1, 2]));
    assert_eq!(err.error.kind, ErrorKind::InvalidPrompt);
    assert!(err.node_errors.is_empty());
    let err = rejected(&json!({"1": {"class_type": "Text", "inputs": [1]}}));
    assert_eq!(err.error.kind, ErrorKind::InvalidPrompt);
    assert_eq!(err.error.details, "Node ID '#1'");
}

#[test]
fn an_unknown_class_is_missing_node_type() {
    let mut prompt = simple();
    prompt["5"] =
        json!({"class_type": "KSampler", "inputs": {}, "_meta": {"title": "Old sampler"}});
    let err = rejected(&prompt);
    let body = serde_json::to_value(&err).unwrap();
    assert_eq!(
        body,
        json!({
            "error": {
                "type": "missing_node_type",
                "message": "Node 'Old sampler' not found. The custom node may not be installed.",
                "details": "Node ID '#5'",
                "extra_info": {"node_id": "5", "class_type": "KSampler", "node_title": "Old sampler"}
            },
            "node_errors": {}
        })
    );
    // Without a title the class names the node.
    let err = rejected(&json!({"7": {"class_type": "Nope", "inputs": {}}}));
    assert_eq!(
        err.error.message,
        "Node 'Nope' not found. The custom node may not be installed."
    );
}

#[test]
fn a_node_without_class_type_is_missing_node_type() {
    let err = rejected(&json!({"4": {"inputs": {}}}));
    assert_eq!(err.error.kind, ErrorKind::MissingNodeType);
    assert_eq!(
        err.error.message,
        "Node 'ID #4' has no class_type. The workflow may be corrupted or a custom node is missing."
    );
    assert_eq!(err.error.extra_info["class_type"], Value::Null);
}

#[test]
fn no_output_node_is_prompt_no_outputs() {
    let err = rejected(&json!({"1": sampler(json!(1))}));
    assert_eq!(
        serde_json::to_value(&err).unwrap(),
        json!({
            "error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}},
            "node_errors": {}
        })
    );
}

// --- per-node errors ---------------------------------------------------------

#[test]
fn a_missing_required_input_is_reported_on_its_node() {
    let prompt = without_input(simple(), "1", "cfg");
    let err = rejected(&prompt);
    let body = serde_json::to_value(&err).unwrap();
    assert_eq!(
        body,
        json!({
            "error": {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                // Only the output node's own errors make the summary.
                "details": "",
                "extra_info": {}
            },
            "node_errors": {
                "1": {
                    "errors": [{
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": "cfg",
                        "extra_info": {"input_name": "cfg"}
                    }],
                    "dependent_outputs": ["2"],
                    "class_type": "Sampler"
                }
            }
        })
    );
}

#[test]
fn errors_of_the_output_node_itself_make_the_summary() {
    let prompt = without_input(simple(), "2", "filename_prefix");
    let err = rejected(&prompt);
    assert_eq!(
        err.error.details,
        "Required input is missing: filename_prefix"
    );
}

#[test]
fn every_error_of_a_node_is_listed_in_input_order() {
    let prompt = without_input(without_input(simple(), "1", "tiled"), "1", "seed");
    let err = rejected(&prompt);
    let details: Vec<&str> = err.node_errors["1"]
        .errors
        .iter()
        .map(|e| e.details.as_str())
        .collect();
    assert_eq!(details, ["seed", "tiled"]);
}

#[test]
fn a_link_that_is_not_a_pair_is_bad_linked_input() {
    for bad in [
        json!(["1", 0, 1]),
        json!(["1"]),
        json!([1, 0]),
        json!(["1", -1]),
        json!(["1", 0.5]),
    ] {
        let error = node_error(&with_input(simple(), "2", "images", bad.clone()), "2");
        assert_eq!(error.kind, ErrorKind::BadLinkedInput, "{bad}");
        assert_eq!(
            error.message,
            "Bad linked input, must be a length-2 list of [node_id, slot_index]"
        );
        assert_eq!(error.details, "images");
        assert_eq!(error.extra_info["received_value"], bad);
        assert_eq!(error.extra_info["input_config"], json!(["IMAGE", {}]));
    }
}

#[test]
fn a_link_to_a_missing_node_is_an_exception_during_validation() {
    let error = node_error(&with_input(simple(), "2", "images", json!(["12", 0])), "2");
    assert_eq!(error.kind, ErrorKind::ExceptionDuringValidation);
    assert_eq!(error.message, "Exception when validating node");
    assert_eq!(error.details, "images: node '12' does not exist");
    assert_eq!(error.extra_info["exception_type"], "KeyError");
    assert_eq!(error.extra_info["linked_node"], json!(["12", 0]));
}

#[test]
fn a_bad_link_on_an_inner_node_is_an_inner_exception() {
    let prompt = json!({
        "1": {"class_type": "Pass", "inputs": {"image": ["12", 0]}},
        "2": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let err = rejected(&prompt);
    assert_eq!(
        err.node_errors.keys().collect::<Vec<_>>(),
        ["1"],
        "the output has no errors of its own"
    );
    let error = &err.node_errors["1"].errors[0];
    assert_eq!(error.kind, ErrorKind::ExceptionDuringInnerValidation);
    assert_eq!(error.message, "Exception when validating inner node");
    assert_eq!(err.node_errors["1"].dependent_outputs, ["2"]);
}

#[test]
fn a_link_to_a_missing_output_index_is_an_index_error() {
    let error = node_error(&with_input(simple(), "2", "images", json!(["1", 2])), "2");
    assert_eq!(error.kind, ErrorKind::ExceptionDuringValidation);
    assert_eq!(
        error.details,
        "images: node '1' (Sampler) has no output 2 (it has 2)"
    );
    assert_eq!(error.extra_info["exception_type"], "IndexError");
}

#[test]
fn a_link_of_the_wrong_type_is_return_type_mismatch() {
    let error = node_error(&with_input(simple(), "2", "images", json!(["1", 1])), "2");
    assert_eq!(error.kind, ErrorKind::ReturnTypeMismatch);
    assert_eq!(error.message, "Return type mismatch between linked nodes");
    assert_eq!(
        error.details,
        "images, received_type(LATENT) mismatch input_type(IMAGE)"
    );
    assert_eq!(
        error.extra_info,
        json!({
            "input_name": "images",
            "input_config": ["IMAGE", {}],
            "received_type": "LATENT",
            "linked_node": ["1", 1]
        })
    );
}

#[test]
fn a_list_output_into_a_different_combo_is_a_mismatch() {
    let prompt = json!({
        "1": {"class_type": "ListFiles", "inputs": {}},
        "2": {"class_type": "PickCombo", "inputs": {"file": ["1", 0], "tags": "p", "remote": "r"}},
        "3": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    // A list output feeds a "COMBO" input ("2" passes), but not an IMAGE one.
    let validated = run(&prompt).unwrap();
    assert_eq!(validated.graph.outputs(), ["2".to_string()]);
    let error = &validated.node_errors["3"].errors[0];
    assert_eq!(error.kind, ErrorKind::ReturnTypeMismatch);
    assert_eq!(
        error.details,
        "images, received_type(['a.safetensors', 'b.safetensors']) mismatch input_type(IMAGE)"
    );
    let other_list = json!({
        "1": {"class_type": "ListFiles", "inputs": {}},
        "2": {"class_type": "Big", "inputs": {"choice": ["1", 0]}}
    });
    assert_eq!(
        node_error(&other_list, "2").kind,
        ErrorKind::ReturnTypeMismatch
    );
}

#[test]
fn an_int_that_is_not_a_number_is_invalid_input_type() {
    let error = node_error(&with_input(simple(), "1", "seed", json!("abc")), "1");
    assert_eq!(error.kind, ErrorKind::InvalidInputType);
    assert_eq!(
        error.message,
        "Failed to convert an input value to a INT value"
    );
    assert_eq!(
        error.details,
        "seed, abc, invalid literal for int() with base 10: 'abc'"
    );
    assert_eq!(error.extra_info["received_value"], "abc");
    assert_eq!(
        error.extra_info["exception_message"],
        "invalid literal for int() with base 10: 'abc'"
    );
    for bad in [json!("5.5"), json!(null), json!({"a": 1}), json!("")] {
        let error = node_error(&with_input(simple(), "1", "seed", bad.clone()), "1");
        assert_eq!(error.kind, ErrorKind::InvalidInputType, "{bad}");
    }
    let error = node_error(&with_input(simple(), "1", "seed", json!(null)), "1");
    assert_eq!(
        error.details,
        "seed, None, int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
    );
}

#[test]
fn a_float_that_is_not_a_number_is_invalid_input_type() {
    let error = node_error(&with_input(simple(), "1", "cfg", json!("fast")), "1");
    assert_eq!(error.kind, ErrorKind::InvalidInputType);
    assert_eq!(
        error.message,
        "Failed to convert an input value to a FLOAT value"
    );
    assert_eq!(
        error.details,
        "cfg, fast, could not convert string to float: 'fast'"
    );
    assert_eq!(
        node_error(&with_input(simple(), "1", "cfg", json!("nan")), "1").kind,
        ErrorKind::InvalidInputType
    );
    let graph = run(&with_input(simple(), "1", "cfg", json!(" 2.5 ")))
        .unwrap()
        .graph;
    assert_eq!(
        graph.node("1").unwrap().inputs["cfg"],
        Input::Value(json!(2.5))
    );
}

#[test]
fn string_and_boolean_inputs_refuse_objects() {
    let error = node_error(
        &with_input(simple(), "1", "prompt", json!({"text": "x"})),
        "1",
    );
    assert_eq!(error.kind, ErrorKind::InvalidInputType);
    assert_eq!(
        error.message,
        "Failed to convert an input value to a STRING value"
    );
    assert_eq!(
        node_error(&with_input(simple(), "1", "prompt", json!(null)), "1").kind,
        ErrorKind::InvalidInputType
    );
    let error = node_error(&with_input(simple(), "1", "tiled", json!("false")), "1");
    assert_eq!(error.kind, ErrorKind::InvalidInputType);
    assert_eq!(
        error.message,
        "Failed to convert an input value to a BOOLEAN value"
    );
    // Numbers and booleans become Python's text.
    let graph = run(&with_input(simple(), "1", "prompt", json!(true)))
        .unwrap()
        .graph;
    assert_eq!(
        graph.node("1").unwrap().inputs["prompt"],
        Input::Value(json!("True"))
    );
    let graph = run(&with_input(simple(), "1", "prompt", json!(0.5)))
        .unwrap()
        .graph;
    assert_eq!(
        graph.node("1").unwrap().inputs["prompt"],
        Input::Value(json!("0.5"))
    );
}

#[test]
fn numbers_out_of_range_are_too_small_or_too_big() {
    let error = node_error(&with_input(simple(), "1", "seed", json!(-1)), "1");
    assert_eq!(error.kind, ErrorKind::ValueSmallerThanMin);
    assert_eq!(error.message, "Value -1 smaller than min of 0");
    assert_eq!(error.details, "seed");
    assert_eq!(
        error.extra_info,
        json!({
            "input_name": "seed",
            "input_config": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615u64}],
            "received_value": -1
        })
    );
    // 2^64 arrives as a float and converts to an int just past the max.
    let error = node_error(
        &with_input(simple(), "1", "seed", json!(18446744073709551616.0)),
        "1",
    );
    assert_eq!(error.kind, ErrorKind::ValueBiggerThanMax);
    assert_eq!(
        error.message,
        "Value 18446744073709551616 bigger than max of 18446744073709551615"
    );

    let error = node_error(&with_input(simple(), "1", "cfg", json!(12)), "1");
    assert_eq!(error.kind, ErrorKind::ValueBiggerThanMax);
    assert_eq!(error.message, "Value 12.0 bigger than max of 10.0");
    let error = node_error(&with_input(simple(), "1", "cfg", json!(-0.25)), "1");
    assert_eq!(error.message, "Value -0.25 smaller than min of 0.0");

    let rate = |lr: Value| json!({"1": {"class_type": "Rate", "inputs": {"lr": lr}}});
    let error = node_error(&rate(json!(0.00000001)), "1");
    assert_eq!(error.message, "Value 1e-08 smaller than min of 1e-07");
    assert!(run(&rate(json!(0.0000001))).is_ok());
    assert!(run(&rate(json!(10))).is_ok());
}

#[test]
fn a_combo_value_not_in_the_list_is_value_not_in_list() {
    let error = node_error(&with_input(simple(), "1", "sampler", json!("dpm")), "1");
    assert_eq!(error.kind, ErrorKind::ValueNotInList);
    assert_eq!(error.message, "Value not in list");
    assert_eq!(error.details, "sampler: 'dpm' not in ['euler', 'heun']");
    assert_eq!(
        error.extra_info,
        json!({
            "input_name": "sampler",
            "input_config": [["euler", "heun"], {"default": "euler"}],
            "received_value": "dpm"
        })
    );
    let combo = |file: Value, tags: Value| json!({"1": {"class_type": "PickCombo", "inputs": {"file": file, "tags": tags, "remote": 1}}});
    let error = node_error(&combo(json!("z"), json!("p")), "1");
    assert_eq!(error.details, "file: 'z' not in ['x', 'y']");
    let error = node_error(
        &combo(json!("x"), json!({"__value__": ["p", "s", "t"]})),
        "1",
    );
    assert_eq!(error.details, "tags: 's', 't' not in ['p', 'q', 'r']");
    // Long lists are not echoed back.
    let error = node_error(
        &json!({"1": {"class_type": "Big", "inputs": {"choice": "nope"}}}),
        "1",
    );
    assert_eq!(error.details, "choice: 'nope' not in (list of length 25)");
    assert_eq!(error.extra_info["input_config"], Value::Null);
}

#[test]
fn a_cycle_is_reported_on_every_node_of_it() {
    let prompt = json!({
        "1": {"class_type": "Loop", "inputs": {"a": ["3", 0]}},
        "2": {"class_type": "Loop", "inputs": {"a": ["1", 0]}},
        "3": {"class_type": "Loop", "inputs": {"a": ["2", 0]}},
        "4": {"class_type": "Save", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}
    });
    let err = rejected(&prompt);
    assert_eq!(err.error.kind, ErrorKind::PromptOutputsFailedValidation);
    assert_eq!(err.node_errors.keys().collect::<Vec<_>>(), ["1", "2", "3"]);
    let error = &err.node_errors["3"].errors[0];
    assert_eq!(error.kind, ErrorKind::DependencyCycle);
    assert_eq!(error.message, "Dependency cycle detected");
    assert_eq!(
        error.details,
        "3 (Loop) -> 2 (Loop) -> 1 (Loop) -> 3 (Loop)"
    );
    assert_eq!(
        error.extra_info,
        json!({"node_id": "3", "cycle_nodes": ["3", "2", "1"]})
    );
    for node in ["1", "2", "3"] {
        assert_eq!(err.node_errors[node].errors.len(), 1);
        assert_eq!(err.node_errors[node].dependent_outputs, ["4"]);
    }
}

#[test]
fn a_node_linked_to_itself_is_a_cycle() {
    let prompt = json!({
        "1": {"class_type": "Loop", "inputs": {"a": ["1", 0]}},
        "2": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let error = node_error(&prompt, "1");
    assert_eq!(error.kind, ErrorKind::DependencyCycle);
    assert_eq!(error.details, "1 (Loop) -> 1 (Loop)");
}

#[test]
fn a_cycle_through_an_optional_input_with_other_errors_keeps_both() {
    let prompt = json!({
        "1": {"class_type": "Loop", "inputs": {"a": ["2", 0], "b": ["3", 5]}},
        "2": {"class_type": "Loop", "inputs": {"a": ["1", 0]}},
        "3": sampler(json!(1)),
        "4": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let err = rejected(&prompt);
    let kinds: Vec<ErrorKind> = err.node_errors["1"].errors.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            ErrorKind::DependencyCycle,
            ErrorKind::ExceptionDuringInnerValidation
        ]
    );
}

#[test]
fn one_bad_output_among_good_ones_is_answered_with_node_errors() {
    let mut prompt = simple();
    prompt["3"] =
        json!({"class_type": "Save", "inputs": {"images": ["1", 1], "filename_prefix": "x"}});
    let validated = run(&prompt).unwrap();
    assert_eq!(validated.graph.outputs(), ["2".to_string()]);
    assert_eq!(validated.node_errors.keys().collect::<Vec<_>>(), ["3"]);
    assert_eq!(validated.node_errors["3"].dependent_outputs, ["3"]);
    assert_eq!(validated.node_errors["3"].class_type, "Save");
}

#[test]
fn dependent_outputs_name_every_failed_output_behind_the_node() {
    let mut prompt = with_input(simple(), "1", "seed", json!(-5));
    prompt["3"] =
        json!({"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "b"}});
    prompt["10"] = json!({"class_type": "Rate", "inputs": {"lr": 100}});
    let err = rejected(&prompt);
    assert_eq!(err.node_errors["1"].dependent_outputs, ["2", "3"]);
    // "10" fails on its own and does not depend on "1".
    assert_eq!(err.node_errors["10"].dependent_outputs, ["10"]);
    assert_eq!(err.error.details, "Value 100.0 bigger than max of 10.0: lr");
}

#[test]
fn the_error_body_serializes_as_comfyui_sends_it() {
    let err = rejected(&with_input(simple(), "2", "images", json!(["1", 1])));
    let body = serde_json::to_value(&err).unwrap();
    let node = &body["node_errors"]["2"];
    assert_eq!(node["class_type"], "Save");
    assert_eq!(node["dependent_outputs"], json!(["2"]));
    assert_eq!(node["errors"][0]["type"], "return_type_mismatch");
    assert_eq!(
        body["error"]["details"],
        "Return type mismatch between linked nodes: images, received_type(LATENT) mismatch input_type(IMAGE)"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "Prompt outputs failed validation: {}",
            body["error"]["details"].as_str().unwrap()
        )
    );
}

#[test]
fn deep_chains_are_checked_without_overflowing_and_too_deep_ones_are_refused() {
    fn chain(length: usize) -> Value {
        let mut prompt = Map::new();
        prompt.insert("0".into(), sampler(json!(1)));
        for i in 1..length {
            prompt.insert(
                i.to_string(),
                json!({"class_type": "Pass", "inputs": {"image": [(i - 1).to_string(), 0]}}),
            );
        }
        prompt.insert(
            "out".into(),
            json!({"class_type": "Save", "inputs": {"images": [(length - 1).to_string(), 0], "filename_prefix": "x"}}),
        );
        Value::Object(prompt)
    }
    let graph = run(&chain(500)).unwrap().graph;
    assert_eq!(execution_order(&graph, |_| false).len(), 501);
    assert_eq!(signatures(&graph, |_, _| None).len(), 501);
    let err = rejected(&chain(MAX_LINK_DEPTH + 10));
    assert!(err
        .node_errors
        .values()
        .any(|n| n.errors[0].kind == ErrorKind::ExceptionDuringValidation));
}

// --- the real node definitions ------------------------------------------------

#[test]
fn the_embedded_node_definitions_validate_a_train_and_sample_graph() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node_defs");
    let mut object_info = Map::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let def: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            object_info.insert(def["name"].as_str().unwrap().to_owned(), def);
        }
    }
    let defs = NodeDefs::from_object_info(&Value::Object(object_info.clone()));
    // Fill every required input of each class with its default (combos: the first option).
    for (class, def) in &object_info {
        let mut inputs = Map::new();
        for (name, spec) in def["input"]["required"].as_object().unwrap() {
            let value = match &spec[0] {
                Value::Array(options) if !options.is_empty() => options[0].clone(),
                Value::Array(_) => continue,
                _ => spec[1]["default"].clone(),
            };
            inputs.insert(name.clone(), value);
        }
        let prompt = json!({"1": {"class_type": class, "inputs": inputs}});
        match validate(&prompt, &defs, None) {
            Ok(_) => assert!(def["output_node"] == true, "{class}"),
            Err(e) if def["output_node"] == false => {
                assert_eq!(e.error.kind, ErrorKind::PromptNoOutputs, "{class}")
            }
            Err(e) => {
                // Only a combo filled at run time (an empty list) may be left unset.
                for node in e.node_errors.values() {
                    for error in &node.errors {
                        assert_eq!(
                            error.kind,
                            ErrorKind::RequiredInputMissing,
                            "{class}: {error:?}"
                        );
                    }
                }
            }
        }
    }
    // Dataset → Train → Apply LoRA → Flux Sample → Save Image.
    let mut train = Map::new();
    for (name, spec) in object_info["FluxLoraTrain"]["input"]["required"]
        .as_object()
        .unwrap()
    {
        if spec[0].is_string() && spec[1].get("default").is_some() {
            train.insert(name.clone(), spec[1]["default"].clone());
        }
    }
    train.insert("dataset".into(), json!(["5", 0]));
    let prompt = json!({
        "5": {"class_type": "FluxLoraDataset", "inputs": {
            "source": "demo", "folder": "", "trigger_word": "zorbly", "caption_template": "",
            "num_repeats": 1, "resolution": 64, "enable_bucket": false,
        }},
        "1": {"class_type": "FluxLoraTrain", "inputs": train},
        "2": {"class_type": "FluxLoraApply", "inputs": {"lora": ["1", 0], "strength": 0.8}},
        "3": {"class_type": "FluxLoraSample", "inputs": {
            "prompt": "a cat", "width": 512, "height": 512, "steps": 4, "guidance": 3.5, "seed": 1,
            "batch_size": 1, "loras": ["2", 0]
        }},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    });
    let graph = validate(&prompt, &defs, None).unwrap().graph;
    assert_eq!(graph.outputs(), ["1".to_string(), "4".to_string()]);
    let steps: Vec<NodeId> = execution_order(&graph, |_| false)
        .into_iter()
        .map(|s| s.node)
        .collect();
    assert_eq!(steps, ["5", "1", "2", "3", "4"]);
    // A trained LoRA does not fit a stack input.
    let mut wrong = prompt.clone();
    wrong["3"]["inputs"]["loras"] = json!(["1", 0]);
    // Train still runs (an output itself); the sampler's branch fails.
    let partly = validate(&wrong, &defs, None).unwrap();
    assert_eq!(partly.graph.outputs(), ["1".to_string()]);
    assert_eq!(
        partly.node_errors["3"].errors[0].kind,
        ErrorKind::ReturnTypeMismatch
    );
}

// --- execution order ---------------------------------------------------------

fn order(graph: &PromptGraph, cached: &[&str]) -> Vec<(String, bool)> {
    execution_order(graph, |id| cached.contains(&id))
        .into_iter()
        .map(|s| (s.node, s.cached))
        .collect()
}

fn names(steps: &[(String, bool)]) -> Vec<&str> {
    steps.iter().map(|(n, _)| n.as_str()).collect()
}

/// Two LoRAs stacked into a sampler, saved twice; an unrelated output too.
fn stacked() -> Value {
    json!({
        "10": {"class_type": "Lora", "inputs": {"name": "a.safetensors", "strength": 1.0}},
        "11": {"class_type": "Lora", "inputs": {"name": "b.safetensors", "strength": 0.5, "loras": ["10", 0]}},
        "3": {"class_type": "Sampler", "inputs": {
            "seed": 1, "cfg": 3.5, "sampler": "euler", "prompt": "p", "tiled": false, "loras": ["11", 0]
        }},
        "4": {"class_type": "Pass", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "Save", "inputs": {"images": ["4", 0], "filename_prefix": "a"}},
        "6": {"class_type": "Save", "inputs": {"images": ["3", 0], "filename_prefix": "b"}},
        "7": {"class_type": "Pass", "inputs": {"image": ["3", 0]}}
    })
}

#[test]
fn the_order_runs_only_what_outputs_need_dependencies_first() {
    let graph = run(&stacked()).unwrap().graph;
    let steps = order(&graph, &[]);
    // "7" feeds no output. Output "6" runs as soon as it can, before "4".
    assert_eq!(names(&steps), ["10", "11", "3", "6", "4", "5"]);
    assert!(steps.iter().all(|(_, cached)| !cached));
}

#[test]
fn the_order_does_not_depend_on_the_order_of_the_prompt() {
    let prompt = stacked();
    let mut reversed = Map::new();
    let mut keys: Vec<&String> = prompt.as_object().unwrap().keys().collect();
    keys.reverse();
    for key in keys {
        reversed.insert(key.clone(), prompt[key.as_str()].clone());
    }
    let a = order(&run(&prompt).unwrap().graph, &[]);
    let b = order(&run(&Value::Object(reversed)).unwrap().graph, &[]);
    assert_eq!(a, b);
}

#[test]
fn a_cached_node_cuts_off_what_only_it_needs() {
    let graph = run(&stacked()).unwrap().graph;
    let steps = order(&graph, &["3"]);
    assert_eq!(
        steps,
        [
            ("3".into(), true),
            ("6".into(), false),
            ("4".into(), false),
            ("5".into(), false)
        ]
    );
    // A cached output is still visited (to report its cached result).
    let steps = order(&graph, &["3", "5", "4", "6"]);
    assert_eq!(names(&steps), ["5", "6"]);
    assert!(steps.iter().all(|(_, cached)| *cached));
}

// --- signatures ----------------------------------------------------------------

fn sigs(prompt: &Value) -> BTreeMap<NodeId, Signature> {
    signatures(&run(prompt).unwrap().graph, |_, _| None)
}

#[test]
fn signatures_ignore_node_ids_and_input_order() {
    let a = sigs(&stacked());
    let renamed = json!({
        "a": {"class_type": "Lora", "inputs": {"strength": 1.0, "name": "a.safetensors"}},
        "b": {"class_type": "Lora", "inputs": {"loras": ["a", 0], "strength": 0.5, "name": "b.safetensors"}},
        "s": {"class_type": "Sampler", "inputs": {
            "loras": ["b", 0], "tiled": false, "prompt": "p", "sampler": "euler", "cfg": 3.5, "seed": 1
        }},
        "o": {"class_type": "Save", "inputs": {"images": ["s", 0], "filename_prefix": "b"}}
    });
    let b = sigs(&renamed);
    assert_eq!(a["10"], b["a"]);
    assert_eq!(a["11"], b["b"]);
    assert_eq!(a["3"], b["s"]);
    assert_eq!(a["6"], b["o"]);
    // The same prompt gives the same keys every time.
    assert_eq!(a, sigs(&stacked()));
}

#[test]
fn a_changed_constant_changes_its_node_and_everything_downstream_only() {
    let before = sigs(&stacked());
    let mut prompt = stacked();
    prompt["11"]["inputs"]["strength"] = json!(0.75);
    let after = sigs(&prompt);
    assert_eq!(before["10"], after["10"]);
    for node in ["11", "3", "4", "5", "6"] {
        assert_ne!(before[node], after[node], "{node}");
    }
    // Values that convert to the same constant give the same key.
    let mut prompt = stacked();
    prompt["3"]["inputs"]["seed"] = json!("1");
    prompt["3"]["inputs"]["cfg"] = json!("3.5");
    assert_eq!(sigs(&prompt)["3"], before["3"]);
}

#[test]
fn signatures_tell_outputs_classes_and_salts_apart() {
    let graph = run(&stacked()).unwrap().graph;
    let plain = signatures(&graph, |_, _| None);
    // Two Saves of the same image with different prefixes differ; a save of
    // another output index would too.
    assert_ne!(plain["5"], plain["6"]);
    let salted = signatures(&graph, |id, _| {
        (id == "10").then(|| "file hash 1".to_string())
    });
    assert_ne!(plain["10"], salted["10"]);
    assert_ne!(plain["3"], salted["3"], "a salt reaches downstream nodes");
    assert_eq!(plain["10"].to_string().len(), 64);

    // The output index of a link is part of the key ("anything" takes either output).
    let any = |index: u64| {
        json!({"1": {"class_type": "Sampler", "inputs": {
                   "seed": 1, "cfg": 3.5, "sampler": "euler", "prompt": "p", "tiled": false, "anything": ["2", index]}},
               "2": sampler(json!(2)),
               "3": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})
    };
    assert_ne!(sigs(&any(0))["1"], sigs(&any(1))["1"]);
    assert_eq!(sigs(&any(0))["2"], sigs(&any(1))["2"]);
    // Same constants, another class: another key.
    let text = |class: &str| {
        json!({"1": {"class_type": class, "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
                                    "2": sampler(json!(2))})
    };
    assert_ne!(
        sigs(&text("Save"))["1"],
        sigs(
            &json!({"1": {"class_type": "Preview", "inputs": {"images": ["2", 0]}},
                                                      "2": sampler(json!(2))})
        )["1"]
    );
    assert_eq!(sigs(&text("Save"))["2"], sigs(&any(0))["2"]);
}

// --- Python formatting ------------------------------------------------------------

#[test]
fn floats_print_as_python_prints_them() {
    for (f, text) in [
        (0.5, "0.5"),
        (10.0, "10.0"),
        (1e-7, "1e-07"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-5, "1.5e-05"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (123456789012345678.0, "1.2345678901234568e+17"),
        (-2.5, "-2.5"),
        (0.0, "0.0"),
        (100.25, "100.25"),
    ] {
        assert_eq!(py_float(f), text, "{f}");
    }
    assert_eq!(
        py_repr(&json!(["it's", "a\"b", 1, null, true])),
        r#"["it's", 'a"b', 1, None, True]"#
    );
    assert_eq!(py_repr(&json!({"k": [1.0]})), "{'k': [1.0]}");
}
