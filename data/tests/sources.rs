//! Reading JSONL, JSON arrays, Parquet and the Hugging Face layout; column mapping; errors that name the file,
//! row and column.

mod common;

use std::fs::File;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use data::{load_records, stream_records, AnswerFormat, DataConfig, Format, Message, Record, RecordKind};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

fn qa(path: &std::path::Path) -> DataConfig {
    let mut c = DataConfig::new(path);
    c.prompt = Some("question".into());
    c.answer = Some("answer".into());
    c
}

#[test]
fn jsonl_maps_columns_and_names_bad_rows() {
    let d = common::scratch("jsonl");
    let p = d.join("x.jsonl");
    std::fs::write(&p, "{\"question\": \"1+1?\", \"answer\": 2.0}\n\n{\"question\": \"2+2?\", \"answer\": \"004\"}\n{\"question\": \"x\", \"answer\": null}\n").unwrap();
    let mut c = qa(&p);
    c.limit = Some(2);
    c.system_prompt = Some("Be brief.".into());
    c.prompt_template = Some("{prompt} Think step by step.".into());
    let recs = load_records(&c).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].answer(), Some("2"));
    assert_eq!(recs[1].answer(), Some("4"));
    assert_eq!(recs[1].prompt(), &[Message::system("Be brief."), Message::user("2+2? Think step by step.")]);
    let Record::PromptAnswer { id, .. } = &recs[1] else { panic!() };
    assert!(id.ends_with("x.jsonl:3"), "{id}");
    c.limit = None;
    let e = load_records(&c).unwrap_err().to_string();
    assert!(e.contains("x.jsonl") && e.contains("row 4") && e.contains("`answer`"), "{e}");

    std::fs::write(&p, "{\"question\": \"q\"}\n").unwrap();
    let e = load_records(&qa(&p)).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("`answer`") && e.contains("missing") && e.contains("question"), "{e}");

    std::fs::write(&p, "{\"question\": \"q\", \"answer\": 1}\n{not json\n").unwrap();
    let e = load_records(&qa(&p)).unwrap_err().to_string();
    assert!(e.contains("row 2") && e.contains("invalid JSON"), "{e}");

    std::fs::write(&p, "{\"question\": \"q\", \"answer\": \"no marker\"}\n").unwrap();
    let mut g = qa(&p);
    g.answer_format = AnswerFormat::Gsm8k;
    let e = load_records(&g).unwrap_err().to_string();
    assert!(e.contains("####"), "{e}");
}

#[test]
fn json_array_conversations_and_sharegpt() {
    let d = common::scratch("jsonarr");
    let p = d.join("conv.json");
    std::fs::write(
        &p,
        r#"[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"messages": [{"role": "user", "content": 5}]}]"#,
    )
    .unwrap();
    let mut c = DataConfig::new(&p);
    c.messages = Some("messages".into());
    let mut it = stream_records(&c).unwrap();
    assert_eq!(it.next().unwrap().unwrap(), Record::Conversation { messages: vec![Message::user("hi"), Message::assistant("hello")] });
    assert_eq!(it.next().unwrap().unwrap(), Record::Conversation { messages: vec![Message::user("a"), Message::assistant("b")] });
    let e = it.next().unwrap().unwrap_err().to_string();
    assert!(e.contains("conv.json") && e.contains("row 3") && e.contains("messages[0]") && e.contains("content"), "{e}");
}

#[test]
fn preference_and_completion_records() {
    let d = common::scratch("pref");
    let p = d.join("p.jsonl");
    std::fs::write(
        &p,
        concat!(
            r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "3+3?"}], "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "7"}]}"#, "\n",
            r#"{"prompt": "x", "chosen": [{"role": "user", "content": "6"}], "rejected": "7"}"#, "\n"
        ),
    )
    .unwrap();
    let mut c = DataConfig::new(&p);
    c.prompt = Some("prompt".into());
    c.chosen = Some("chosen".into());
    c.rejected = Some("rejected".into());
    assert_eq!(c.record_kind().unwrap(), RecordKind::Preference);
    let mut it = stream_records(&c).unwrap();
    assert_eq!(it.next().unwrap().unwrap(), Record::Preference { prompt: vec![Message::user("2+2?")], chosen: "4".into(), rejected: "5".into() });
    assert_eq!(it.next().unwrap().unwrap(), Record::Preference { prompt: vec![Message::user("3+3?")], chosen: "6".into(), rejected: "7".into() });
    let e = it.next().unwrap().unwrap_err().to_string();
    assert!(e.contains("row 3") && e.contains("`chosen`") && e.contains("assistant"), "{e}");

    let mut c = DataConfig::new(&p);
    c.prompt = Some("prompt".into());
    c.completion = Some("chosen".into());
    c.limit = Some(1);
    assert_eq!(load_records(&c).unwrap()[0], Record::PromptCompletion { prompt: vec![Message::user("2+2?")], completion: "4".into() });
}

fn write_parquet(path: &std::path::Path, start: usize, n: usize, row_group: usize) {
    let fields = Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)]);
    let mut msgs = ListBuilder::new(StructBuilder::from_fields(fields.clone(), n));
    let mut q = vec![];
    let mut a = vec![];
    for i in start..start + n {
        q.push(format!("What is {i} + 1?"));
        a.push((i + 1) as f64);
        let s = msgs.values();
        for (role, content) in [("user", format!("What is {i} + 1?")), ("assistant", format!("{}", i + 1))] {
            s.field_builder::<StringBuilder>(0).unwrap().append_value(role);
            s.field_builder::<StringBuilder>(1).unwrap().append_value(content);
            s.append(true);
        }
        msgs.append(true);
    }
    let msgs = msgs.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Float64, false),
        Field::new("messages", msgs.data_type().clone(), true),
    ]));
    let cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(q)), Arc::new(Float64Array::from(a)), Arc::new(msgs)];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let props = WriterProperties::builder().set_max_row_group_size(row_group).build();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_streams_row_groups_and_nested_messages() {
    let d = common::scratch("parquet");
    let p = d.join("t.parquet");
    write_parquet(&p, 0, 2500, 700);
    let meta = parquet::file::reader::SerializedFileReader::new(File::open(&p).unwrap()).unwrap();
    use parquet::file::reader::FileReader;
    assert_eq!(meta.metadata().num_row_groups(), 4);
    let recs = load_records(&qa(&p)).unwrap();
    assert_eq!(recs.len(), 2500);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.answer(), Some((i + 1).to_string().as_str()));
        assert_eq!(r.prompt()[0].content, format!("What is {i} + 1?"));
    }
    let Record::PromptAnswer { id, .. } = &recs[2000] else { panic!() };
    assert!(id.ends_with("t.parquet:2001"), "{id}");
    let mut c = DataConfig::new(&p);
    c.messages = Some("messages".into());
    let convs = load_records(&c).unwrap();
    assert_eq!(convs[1234], Record::Conversation { messages: vec![Message::user("What is 1234 + 1?"), Message::assistant("1235")] });
    let mut bad = DataConfig::new(&p);
    bad.prompt = Some("question".into());
    bad.answer = Some("answr".into());
    let e = load_records(&bad).unwrap_err().to_string();
    assert!(e.contains("t.parquet") && e.contains("no column `answr`") && e.contains("(the file's columns: question, answer, messages)"), "{e}");
}

#[test]
fn hugging_face_layout_reads_split_shards_in_order() {
    let d = common::scratch("hf");
    std::fs::create_dir_all(d.join("data")).unwrap();
    write_parquet(&d.join("data/train-00001-of-00002.parquet"), 100, 50, 1000);
    write_parquet(&d.join("data/train-00000-of-00002.parquet"), 0, 100, 1000);
    write_parquet(&d.join("data/test-00000-of-00001.parquet"), 1000, 10, 1000);
    let mut c = qa(&d);
    assert_eq!(data::source::detect_format(&d).unwrap(), Format::Hf);
    let train = load_records(&c).unwrap();
    assert_eq!(train.len(), 150);
    assert!(train.iter().enumerate().all(|(i, r)| r.answer() == Some((i + 1).to_string().as_str())));
    c.split = "test".into();
    assert_eq!(load_records(&c).unwrap()[0].answer(), Some("1001"));
    c.split = "validation".into();
    let e = load_records(&c).unwrap_err().to_string();
    assert!(e.contains("validation"), "{e}");
}

#[test]
fn malformed_files_are_clear_errors() {
    let d = common::scratch("malformed");
    let p = d.join("bad.jsonl");
    let mut bytes = b"{\"question\": \"q\", \"answer\": 1}\n".to_vec();
    bytes.extend_from_slice(b"{\"question\": \"\xff\", \"answer\": 1}\n");
    std::fs::write(&p, bytes).unwrap();
    let e = load_records(&qa(&p)).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("row 2") && e.contains("UTF-8"), "{e}");
    let j = d.join("bad.json");
    std::fs::write(&j, "[{\"question\": \"q\", \"answer\": 1},\n  {oops}]").unwrap();
    let e = load_records(&qa(&j)).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("line 2"), "{e}");
    let x = d.join("data.txt");
    std::fs::write(&x, "").unwrap();
    assert!(load_records(&qa(&x)).unwrap_err().to_string().contains("format"));
    let pq = d.join("notparquet.parquet");
    std::fs::write(&pq, "hello").unwrap();
    let e = load_records(&qa(&pq)).unwrap_err().to_string();
    assert!(e.contains("notparquet.parquet") && e.contains("parquet"), "{e}");
    assert!(load_records(&qa(&d.join("missing.jsonl"))).is_err());
}

#[test]
fn mixtures_load_from_recipe_entries() {
    let d = common::scratch("mix");
    std::fs::write(d.join("a.jsonl"), "{\"q\": \"a1\", \"a\": 1}\n{\"q\": \"a2\", \"a\": 2}\n").unwrap();
    std::fs::write(d.join("b.jsonl"), "{\"q\": \"b1\", \"a\": 3}\n").unwrap();
    #[derive(serde::Deserialize)]
    struct Stage {
        mix: Vec<data::MixEntry>,
    }
    let text = format!(
        "[[mix]]\nweight = 3.0\ndata = {{ path = {:?}, prompt = \"q\", answer = \"a\" }}\n[[mix]]\nname = \"b\"\nweight = 1.0\ndata = {{ path = {:?}, prompt = \"q\", answer = \"a\" }}\n",
        d.join("a.jsonl").display().to_string(),
        d.join("b.jsonl").display().to_string()
    );
    let s: Stage = toml::from_str(&text).unwrap();
    let (recs, mut m) = data::load_mixture(&s.mix, data::SamplerConfig::default(), 0, 1).unwrap();
    assert_eq!((recs[0].len(), recs[1].len()), (2, 1));
    assert_eq!(m.names()[1], "b");
    let draws: Vec<_> = (0..400).map(|_| m.next_item().unwrap()).collect();
    let from_a = draws.iter().filter(|x| x.0 == 0).count();
    assert!((250..350).contains(&from_a), "{from_a}");
    assert!(draws.iter().all(|&(s, i)| i < recs[s].len()));
}
