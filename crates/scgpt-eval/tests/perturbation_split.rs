//! GEARS's splits and numpy's legacy stream against the originals, on the fixtures written by
//! `tests/gen/eval/gen_perturbation_split.py` (cell-gears 0.0.2 and 0.1.2, numpy 2.4): the
//! lists, their order and the subgroups must be identical, draw for draw.

use std::collections::BTreeMap;
use std::path::PathBuf;

use scgpt_eval::perturbation::{
    no_test_split, simulation_split, ConditionFormat, LegacyRandomState, NoTestOptions, NoTestRule, PerturbationSplit, SimulationOptions,
};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn read(name: &str) -> Value {
    let path = data(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn numpy_legacy_stream_is_reproduced() {
    let f = read("perturbation_numpy_rng.json");
    let mut r = LegacyRandomState::new(1).unwrap();
    let raw: Vec<u32> = (0..1300).map(|_| r.next_u32()).collect();
    for (i, v) in f["raw_seed1"].as_object().unwrap() {
        assert_eq!(raw[i.parse::<usize>().unwrap()] as u64, v.as_u64().unwrap(), "raw output {i} after seed 1");
    }
    let mut r = LegacyRandomState::new(1).unwrap();
    for case in f["cases"].as_array().unwrap() {
        if let Some(seed) = case["seed"].as_u64() {
            r = LegacyRandomState::new(seed).unwrap();
        }
        let want: Vec<i64> = case["values"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let call = case["call"].as_str().unwrap();
        let got: Vec<i64> = match call {
            "choice(20, 7, replace=False)" => r.choice_without_replacement(20, 7).unwrap().into_iter().map(|v| v as i64).collect(),
            "permutation(10)" => r.permutation(10).into_iter().map(|v| v as i64).collect(),
            "choice(5, 10)" => r.choice_with_replacement(5, 10).unwrap().into_iter().map(|v| v as i64).collect(),
            "shuffle(list(range(12)))" => {
                let mut v: Vec<i64> = (0..12).collect();
                r.shuffle(&mut v);
                v
            }
            "randint(0, 2**40, size=3)" => r.randint(0, 1 << 40, 3).unwrap(),
            "choice(1000, 5, replace=False)" => r.choice_without_replacement(1000, 5).unwrap().into_iter().map(|v| v as i64).collect(),
            "choice(3, 3, replace=False)" => r.choice_without_replacement(3, 3).unwrap().into_iter().map(|v| v as i64).collect(),
            other => panic!("fixture case {other} has no Rust counterpart"),
        };
        assert_eq!(got, want, "{call}");
    }
}

/// GEARS's set2conditions list without the control (which GEARS appends to train).
fn gears_list(case: &Value, key: &str) -> Vec<String> {
    case["set2conditions"].get(key).map(strings).unwrap_or_default().into_iter().filter(|c| c != "ctrl").collect()
}

/// The flat subgroup map the module documents, built from GEARS's {test,val}_subgroup dicts.
fn expected_subgroups(case: &Value, split: &PerturbationSplit) -> BTreeMap<String, String> {
    let mut want = BTreeMap::new();
    for c in &split.train {
        want.insert(c.clone(), "train".to_string());
    }
    for (dict, prefix) in [("test_subgroup", ""), ("val_subgroup", "val_")] {
        for (name, conds) in case["subgroup"][dict].as_object().unwrap() {
            for c in strings(conds) {
                assert!(want.insert(c.clone(), format!("{prefix}{name}")).is_none(), "{c} in two GEARS subgroups");
            }
        }
    }
    want
}

#[test]
fn splits_match_gears() {
    let mut n_cases = 0;
    for list in ["combos", "singles", "combo_heavy"] {
        let file = format!("perturbation_split_{list}.json");
        let f = read(&file);
        let conditions = strings(&f["conditions"]);
        for case in f["cases"].as_array().unwrap() {
            let seed = case["seed"].as_u64().unwrap();
            let what = format!("{file} {} seed {seed} {}", case["split"], case["gears"]);
            let ours = match case["split"].as_str().unwrap() {
                "simulation" => simulation_split(&conditions, &SimulationOptions { seed, ..Default::default() }).unwrap(),
                "no_test" => {
                    let rule = match case["gears"].as_str().unwrap() {
                        "cell-gears 0.0.2" => NoTestRule::CellGears002,
                        _ => NoTestRule::CellGears01,
                    };
                    no_test_split(&conditions, &NoTestOptions { seed, rule, ..Default::default() }).unwrap()
                }
                other => panic!("{other}"),
            };
            assert_eq!(ours.seed, seed);
            assert_eq!(ours.train, gears_list(case, "train"), "{what}: train");
            assert_eq!(ours.val, gears_list(case, "val"), "{what}: val");
            assert_eq!(ours.test, gears_list(case, "test"), "{what}: test");
            if ours.split == "simulation" {
                assert_eq!(ours.subgroup, expected_subgroups(case, &ours), "{what}: subgroups");
            } else {
                assert!(ours.subgroup.is_empty());
            }
            ours.validate(&conditions, &ConditionFormat::default(), &what).unwrap();
            n_cases += 1;
        }
    }
    assert_eq!(n_cases, 18);
}

#[test]
fn the_order_of_cells_does_not_change_which_conditions_go_where() {
    let f = read("perturbation_split_combos.json");
    let conditions = strings(&f["conditions"]);
    let mut reversed = conditions.clone();
    reversed.reverse();
    let a = simulation_split(&conditions, &SimulationOptions::default()).unwrap();
    let b = simulation_split(&reversed, &SimulationOptions::default()).unwrap();
    assert_eq!(a.subgroup, b.subgroup);
}

#[test]
fn save_load_and_validation_errors() {
    let f = read("perturbation_split_combos.json");
    let conditions = strings(&f["conditions"]);
    let split = simulation_split(&conditions, &SimulationOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("split.json");
    split.save(&path).unwrap();
    let back = PerturbationSplit::load_for_screen(&path, &conditions, &ConditionFormat::default()).unwrap();
    assert_eq!(back, split);

    let check = |s: &PerturbationSplit, needle: &str| {
        s.save(&path).unwrap();
        let e = format!("{:#}", PerturbationSplit::load_for_screen(&path, &conditions, &ConditionFormat::default()).unwrap_err());
        assert!(e.contains(needle) && e.contains("split.json"), "{e}");
    };
    let mut s = split.clone();
    s.test.push("NOTAGENE+ctrl".into());
    check(&s, "\"NOTAGENE+ctrl\", which is not a condition of this screen");
    let mut s = split.clone();
    s.val.push(s.train[0].clone());
    check(&s, "is listed twice");
    let mut s = split.clone();
    s.val.append(&mut s.test);
    s.subgroup.clear();
    check(&s, "the test list is empty");
    let mut s = split.clone();
    s.train.pop();
    check(&s, "in none of train/val/test");
    let mut s = split.clone();
    s.test.push("ctrl".into());
    check(&s, "control cells are training data only");
    let mut s = split.clone();
    s.test.push("A+B+C".into());
    check(&s, "\"A+B+C\" cannot be read");

    // GEARS's own lists keep ctrl in train, and a split without subgroups is fine.
    let mut s = split.clone();
    s.train.push("ctrl".into());
    s.subgroup.clear();
    s.save(&path).unwrap();
    PerturbationSplit::load_for_screen(&path, &conditions, &ConditionFormat::default()).unwrap();

    std::fs::write(&path, r#"{"split": "simulation", "seed": 1, "train": [], "val": [], "tests": []}"#).unwrap();
    let e = format!("{:#}", PerturbationSplit::load(&path).unwrap_err());
    assert!(e.contains("not a perturbation split") && e.contains("tests"), "{e}");
}

#[test]
fn a_seed_numpy_refuses_is_an_error() {
    let e = simulation_split(&["A+ctrl"], &SimulationOptions { seed: 1 << 33, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("0..=4294967295"), "{e}");
}
