//! Lua scripts in scenarios: Lua 5.4, built from source by `mlua`
//! (`vendored`), one fresh interpreter per script run, sandboxed.
//!
//! The sandbox: only the `string`, `table`, `math` and `utf8` libraries
//! beside the base one, and from the base one no `dofile`, `loadfile`,
//! `load` (it would take bytecode), `require` or `collectgarbage`: no file,
//! no process, no network, no module. `print` writes to the scenario's log.
//! Each run has limits: instructions, wall time, memory; past one, the
//! script stops with an error that says which, and its run fails.
//!
//! What a script may use is the global `majordome`: `majordome.trigger`
//! (what fired), `majordome.value(uuid, quantity)`, `majordome.state(key)`,
//! and the actions `majordome.command(uuid, command, data?)`,
//! `majordome.set(key, value)`, `majordome.publish(category, data)`,
//! `majordome.call(service, action, data?)`, `majordome.log(message)`. A
//! condition's script gets the reads only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, VmState};
use serde_json::Value;

/// A script's bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Lua VM instructions.
    pub instructions: u64,
    /// Wall time (calls to the bus included).
    pub time: Duration,
    /// Bytes the interpreter may hold.
    pub memory: usize,
}

impl Limits {
    /// For an action's script: 100 million instructions, 10 s, 16 MiB.
    pub const ACTION: Limits = Limits {
        instructions: 100_000_000,
        time: Duration::from_secs(10),
        memory: 16 * 1024 * 1024,
    };
    /// For a condition's: it runs on the engine's own thread, so a tenth
    /// of a second at most.
    pub const CONDITION: Limits = Limits {
        instructions: 1_000_000,
        time: Duration::from_millis(100),
        memory: 4 * 1024 * 1024,
    };
}

/// What a script may do beyond computing: read the hub's state and act.
pub trait Api {
    /// A Clone key's value.
    fn state(&mut self, key: &str) -> Option<Value>;
    fn command(&mut self, device: &str, command: &str, data: Value) -> Result<Value, String>;
    fn set(&mut self, key: &str, value: Value) -> Result<(), String>;
    fn publish(&mut self, category: &str, data: Value) -> Result<(), String>;
    fn call(&mut self, service: &str, action: &str, data: Value) -> Result<Value, String>;
    fn log(&mut self, message: &str);
}

/// How often the limits are checked, in instructions.
const CHECK_EVERY: u32 = 10_000;

/// A fresh interpreter with the sandbox and the limits set; `stop` stops
/// it from outside (a stop request, a shutdown).
fn sandbox(limits: Limits, stop: Arc<AtomicBool>) -> Result<Lua, String> {
    let lua = Lua::new_with(
        StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let globals = lua.globals();
    for name in ["dofile", "loadfile", "load", "require", "collectgarbage"] {
        globals.set(name, mlua::Nil).map_err(|e| e.to_string())?;
    }
    if let Ok(string) = globals.get::<mlua::Table>("string") {
        let _ = string.set("dump", mlua::Nil);
    }
    lua.set_memory_limit(limits.memory).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let counted = std::cell::Cell::new(0u64);
    lua.set_hook(HookTriggers::new().every_nth_instruction(CHECK_EVERY), move |_, _| {
        counted.set(counted.get() + u64::from(CHECK_EVERY));
        if counted.get() > limits.instructions {
            return Err(mlua::Error::runtime(format!(
                "stopped: more than {} instructions",
                limits.instructions
            )));
        }
        if started.elapsed() > limits.time {
            return Err(mlua::Error::runtime(format!(
                "stopped: ran longer than {:?}",
                limits.time
            )));
        }
        if stop.load(Ordering::Relaxed) {
            return Err(mlua::Error::runtime("stopped by request"));
        }
        Ok(VmState::Continue)
    })
    .map_err(|e| e.to_string())?;
    Ok(lua)
}

/// A script's error as one line: its own message, without Lua's traceback.
fn said(error: mlua::Error) -> String {
    let text = match &error {
        mlua::Error::CallbackError { cause, .. } => return said((**cause).clone()),
        mlua::Error::MemoryError(_) => "stopped: it used more memory than allowed".to_owned(),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or_default().trim().to_owned()
}

/// Whether `source` compiles (at save time).
pub fn compile(source: &str) -> Result<(), String> {
    let lua = sandbox(Limits::CONDITION, Arc::default())?;
    lua.load(source)
        .set_mode(mlua::chunk::ChunkMode::Text)
        .into_function()
        .map(|_| ())
        .map_err(said)
}

/// The chunk of a condition: a bare expression is returned (`x > 3`), a
/// chunk is run as it is (`return x > 3`).
fn condition_chunk(source: &str) -> String {
    if source.trim_start().starts_with("return") || source.contains('\n') || source.contains(';') {
        source.to_owned()
    } else {
        format!("return ({source})")
    }
}

/// A condition's script: it may read (`majordome.trigger`, `.value`,
/// `.state`) and returns whether it holds (anything but `false` and `nil`).
pub fn condition(source: &str, context: &Value, read: &dyn Fn(&str) -> Option<Value>) -> Result<bool, String> {
    let lua = sandbox(Limits::CONDITION, Arc::default())?;
    lua.scope(|scope| {
        let api = lua.create_table()?;
        api.set("trigger", lua.to_value(&context["trigger"])?)?;
        api.set(
            "state",
            scope.create_function(|lua, key: String| lua.to_value(&read(&key)))?,
        )?;
        api.set(
            "value",
            scope.create_function(|lua, (uuid, quantity): (String, String)| {
                let value = read(&format!("/device/{uuid}/{quantity}"));
                lua.to_value(&value.map(|v| v.get("level").cloned().unwrap_or(v)))
            })?,
        )?;
        lua.globals().set("majordome", api)?;
        let result: mlua::Value = lua
            .load(condition_chunk(source))
            .set_mode(mlua::chunk::ChunkMode::Text)
            .eval()?;
        Ok(!matches!(result, mlua::Value::Nil | mlua::Value::Boolean(false)))
    })
    .map_err(said)
}

/// An action's script, with the whole API; what it returns (as JSON) is
/// the action's result.
pub fn action(source: &str, context: &Value, api: &mut dyn Api, stop: Arc<AtomicBool>) -> Result<Value, String> {
    action_with(source, context, api, stop, Limits::ACTION)
}

/// The same with other limits (tests).
pub fn action_with(
    source: &str,
    context: &Value,
    api: &mut dyn Api,
    stop: Arc<AtomicBool>,
    limits: Limits,
) -> Result<Value, String> {
    let lua = sandbox(limits, stop)?;
    let api = std::cell::RefCell::new(api);
    let failed = |why: String| mlua::Error::runtime(why);
    lua.scope(|scope| {
        let table = lua.create_table()?;
        table.set("trigger", lua.to_value(&context["trigger"])?)?;
        table.set(
            "state",
            scope.create_function(|lua, key: String| {
                let value = api.borrow_mut().state(&key);
                lua.to_value(&value)
            })?,
        )?;
        table.set(
            "value",
            scope.create_function(|lua, (uuid, quantity): (String, String)| {
                let value = api.borrow_mut().state(&format!("/device/{uuid}/{quantity}"));
                lua.to_value(&value.map(|v| v.get("level").cloned().unwrap_or(v)))
            })?,
        )?;
        table.set(
            "command",
            scope.create_function(|lua, (uuid, command, data): (String, String, Option<mlua::Value>)| {
                let data: Value = match data {
                    Some(data) => lua.from_value(data)?,
                    None => Value::Object(Default::default()),
                };
                let result = api.borrow_mut().command(&uuid, &command, data).map_err(failed)?;
                lua.to_value(&result)
            })?,
        )?;
        table.set(
            "set",
            scope.create_function(|lua, (key, value): (String, mlua::Value)| {
                let value: Value = lua.from_value(value)?;
                api.borrow_mut().set(&key, value).map_err(failed)
            })?,
        )?;
        table.set(
            "publish",
            scope.create_function(|lua, (category, data): (String, Option<mlua::Value>)| {
                let data: Value = match data {
                    Some(data) => lua.from_value(data)?,
                    None => Value::Object(Default::default()),
                };
                api.borrow_mut().publish(&category, data).map_err(failed)
            })?,
        )?;
        table.set(
            "call",
            scope.create_function(|lua, (service, action, data): (String, String, Option<mlua::Value>)| {
                let data: Value = match data {
                    Some(data) => lua.from_value(data)?,
                    None => Value::Object(Default::default()),
                };
                let answer = api.borrow_mut().call(&service, &action, data).map_err(failed)?;
                lua.to_value(&answer)
            })?,
        )?;
        let log = scope.create_function(|_, message: mlua::Variadic<mlua::Value>| {
            let text: Vec<String> = message
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| format!("{v:?}")))
                .collect();
            api.borrow_mut().log(&text.join(" "));
            Ok(())
        })?;
        table.set("log", log.clone())?;
        lua.globals().set("print", log)?;
        lua.globals().set("majordome", table)?;
        let result: mlua::Value = lua.load(source).set_mode(mlua::chunk::ChunkMode::Text).eval()?;
        // A value JSON cannot hold (a function) is said as text.
        Ok(lua
            .from_value::<Value>(result.clone())
            .unwrap_or_else(|_| Value::String(format!("{result:?}"))))
    })
    .map_err(said)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        said: Vec<String>,
    }

    impl Api for Recorder {
        fn state(&mut self, key: &str) -> Option<Value> {
            (key == "/device/thermo/temperature").then(|| json!({"level": 17.5}))
        }
        fn command(&mut self, device: &str, command: &str, data: Value) -> Result<Value, String> {
            self.said.push(format!("command {device} {command} {data}"));
            if device == "gone" {
                return Err("error.device.invalid: no device gone".into());
            }
            Ok(json!({"identifier": "success"}))
        }
        fn set(&mut self, key: &str, value: Value) -> Result<(), String> {
            self.said.push(format!("set {key} {value}"));
            Ok(())
        }
        fn publish(&mut self, category: &str, data: Value) -> Result<(), String> {
            self.said.push(format!("publish {category} {data}"));
            Ok(())
        }
        fn call(&mut self, service: &str, action: &str, _: Value) -> Result<Value, String> {
            Ok(json!({"service": service, "action": action}))
        }
        fn log(&mut self, message: &str) {
            self.said.push(format!("log {message}"));
        }
    }

    fn run(source: &str, limits: Limits) -> (Result<Value, String>, Vec<String>) {
        let mut api = Recorder::default();
        let context = json!({"trigger": {"trigger": "value", "value": 17.5}});
        let result = action_with(source, &context, &mut api, Arc::default(), limits);
        (result, api.said)
    }

    #[test]
    fn a_script_reads_and_acts_through_majordome() {
        let source = r#"
            local t = majordome.value("thermo", "temperature")
            if t < 18 and majordome.trigger.trigger == "value" then
                local r = majordome.command("heater", "setlevel", {level = 40})
                majordome.set("/heating/on", true)
                majordome.publish("heating.started", {t = t})
                print("heating at", t, r.identifier)
            end
            return majordome.call("echo", "ping.get").action
        "#;
        let (result, said) = run(source, Limits::ACTION);
        assert_eq!(result.unwrap(), json!("ping.get"));
        assert_eq!(
            said,
            [
                r#"command heater setlevel {"level":40}"#,
                "set /heating/on true",
                r#"publish heating.started {"t":17.5}"#,
                "log heating at 17.5 success",
            ]
        );
    }

    #[test]
    fn a_failed_action_is_the_script_s_error() {
        let (result, _) = run(r#"majordome.command("gone", "on")"#, Limits::ACTION);
        assert!(result.unwrap_err().contains("error.device.invalid: no device gone"));
    }

    #[test]
    fn the_sandbox_has_no_files_processes_modules_or_bytecode() {
        for source in [
            "return io.open('/etc/passwd')",
            "return os.execute('true')",
            "return require('socket')",
            "return dofile('/etc/passwd')",
            "return load('return 1')()",
            "return string.dump(print)",
        ] {
            let (result, _) = run(source, Limits::ACTION);
            assert!(result.is_err(), "{source} ran: {result:?}");
        }
        let (math, _) = run("return math.floor(2.5) + #string.rep('a', 3)", Limits::ACTION);
        assert_eq!(math.unwrap(), json!(5));
    }

    #[test]
    fn a_script_that_loops_or_eats_memory_is_stopped_saying_why() {
        let small = Limits {
            instructions: 1_000_000,
            time: Duration::from_secs(30),
            memory: 4 * 1024 * 1024,
        };
        let (looping, _) = run("while true do end", small);
        assert_eq!(
            looping.unwrap_err(),
            "runtime error: stopped: more than 1000000 instructions"
        );
        let (hungry, _) = run(
            "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end",
            small,
        );
        assert_eq!(hungry.unwrap_err(), "stopped: it used more memory than allowed");
        let slow = Limits {
            instructions: u64::MAX,
            time: Duration::from_millis(50),
            memory: small.memory,
        };
        let (timed, _) = run("while true do end", slow);
        assert!(timed.unwrap_err().contains("ran longer than 50ms"));
        let stop = Arc::new(AtomicBool::new(true));
        let stopped = action_with(
            "while true do end",
            &json!({}),
            &mut Recorder::default(),
            stop,
            Limits::ACTION,
        );
        assert!(stopped.unwrap_err().contains("stopped by request"));
    }

    #[test]
    fn conditions_read_and_compile_checks_catch_syntax() {
        let read = |key: &str| (key == "/device/thermo/temperature").then(|| json!({"level": 17.5}));
        let context = json!({"trigger": {"value": 3}});
        assert!(condition("majordome.value('thermo', 'temperature') < 18", &context, &read).unwrap());
        assert!(!condition("return majordome.trigger.value > 5", &context, &read).unwrap());
        let looping = condition("while true do end\nreturn true", &context, &read).unwrap_err();
        assert!(looping.contains("instructions"), "{looping}");
        let broken = compile("return 1 +").unwrap_err();
        assert!(
            broken.contains("syntax error") && broken.contains("near <eof>"),
            "{broken}"
        );
        assert!(compile("x = 1").is_ok());
    }
}
