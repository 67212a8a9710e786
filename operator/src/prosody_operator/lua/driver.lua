-- The operator's side of evaluating a Prosody config (see prosody_config.py): the sandbox the
-- config runs in, the instruction budget, where errors and options come from, values the operator
-- cannot read, and plain data about the result. The config environment itself is a port of one
-- Prosody version's core/configmanager.lua (configmanager-0.12.lua, configmanager-13.lua), given
-- to evaluate() as a function of this file's helpers (`ctx`).
local real_G = _G
local type, pairs, ipairs, next, select, tostring, tonumber, error, pcall, xpcall =
      type, pairs, ipairs, next, select, tostring, tonumber, error, pcall, xpcall
local rawget, rawset, rawlen, setmetatable, getmetatable =
      rawget, rawset, rawlen, setmetatable, getmetatable
local s_format, s_match, s_gsub, s_sub, s_lower, s_gmatch =
      string.format, string.match, string.gsub, string.sub, string.lower, string.gmatch
local t_concat, t_sort = table.concat, table.sort
local d_getinfo, d_sethook = debug.getinfo, debug.sethook
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local real_load = load

local SANDBOX = "is not available in the operator's sandbox"
local LIMIT = "instruction limit reached"
local HOOK_EVERY = 1000
-- Frames config_location looks at. debug.getinfo(level) itself walks `level` frames, so an
-- unbounded walk costs O(depth²) per call: the walk is capped, and charged to the budget.
local MAX_WALK = 200

-- State of one evaluation (the operator uses a fresh Lua state for each).
local files, display, env_vars, main_file
local G -- the globals the config sees
local budget_left, exhausted, in_handler = 0, false, false
local limit_message = LIMIT -- located where the budget ran out
local source_to_file, short_to_file = {}, {}
local findings, seen_findings, locations, env_at, tracked, assigned_in = {}, {}, {}, {}, {}, {}
local include_stack = {}
local config_table
local unknown_origin = {} -- value the operator cannot read -> where it came from
local unknown_items = {} -- list -> origin of an unknown value appended to it

local function short_src(name) -- what Lua shows for a chunk named "@"..name (LUA_IDSIZE 60)
	if #name <= 59 then return name end
	return "..." .. s_sub(name, -56)
end

local config_location

-- Instruction budget, shared by the main thread and every coroutine the config creates.
local function count_hook()
	if in_handler then return end
	budget_left = budget_left - HOOK_EVERY
	if budget_left < 0 then
		if not exhausted then
			exhausted = true
			local file, line = config_location(3) -- (hooks do not run inside hooks)
			if file then limit_message = s_format("%s:%d: %s", short_src(display[file]), line, LIMIT) end
		end
		error(limit_message, 0)
	end
end

-- Re-raise once the budget is spent, so that a pcall in the config cannot swallow the limit.
local function guard(...)
	if exhausted then error(limit_message, 0) end
	return ...
end

-- The innermost frame running config code: its file and line. `prefer` picks that file's
-- innermost frame if it has one (Prosody's get_line_number looks for the current file).
function config_location(level, prefer)
	local fallback_file, fallback_line
	for frame = level, level + MAX_WALK do
		local info = d_getinfo(frame, "Sl")
		if not info then break end
		if not in_handler then budget_left = budget_left - frame end
		local file = source_to_file[info.source]
		if file and info.currentline and info.currentline > 0 then
			if prefer == nil or file == prefer then return file, info.currentline end
			if not fallback_file then fallback_file, fallback_line = file, info.currentline end
		end
	end
	return fallback_file, fallback_line
end

local function add_finding(file, line, message)
	local name = display[file] or file
	local id = s_format("%s\0%s\0%s", name, tostring(line), message)
	if seen_findings[id] then return end -- e.g. the same warning from every turn of a loop
	seen_findings[id] = true
	findings[#findings + 1] = { file = name, line = line, message = message }
end

local function position_of(message) -- the config file a "file:line: " prefix names, if any
	local src, line = s_match(message, "^(.-):(%d+): ")
	if src and short_to_file[src] then return short_to_file[src], tonumber(line) end
end

-- Message handler: make sure an error names the config file and line it happened at.
local function locate_error(err)
	in_handler = true
	if type(err) == "number" then
		err = tostring(err)
	elseif type(err) ~= "string" then
		err = s_format("(error object is a %s value)", type(err))
	end
	if not position_of(err) then
		err = (s_gsub(err, "^%(operator [^)]*%):%d+: ", "")) -- raised by the operator's own code
		local file, line = config_location(3)
		if file then err = s_format("%s:%d: %s", short_src(display[file]), line, err) end
	end
	in_handler = false
	return err
end

local function normalize(path) -- absolute path without ".", ".." or repeated slashes
	local parts = {}
	for part in s_gmatch(path, "[^/]+") do
		if part == ".." then
			if #parts > 0 then parts[#parts] = nil end
		elseif part ~= "." then
			parts[#parts + 1] = part
		end
	end
	return "/" .. t_concat(parts, "/")
end

-- util/paths.lua (the same in 0.12.3 and 13.0.1), for path_sep "/"
local function resolve_relative_path(parent_path, path)
	if path then
		-- Some normalization
		parent_path = parent_path:gsub("%/+$", "");
		path = path:gsub("^%.%/+", "");
		if path:sub(1,1) ~= "/" then
			return parent_path.."/"..path;
		end
	end
	return path;
end

local function glob_to_pattern(glob)
	return "^"..glob:gsub("[%p*?]", function (c)
		if c == "*" then
			return ".*";
		elseif c == "?" then
			return ".";
		else
			return "%"..c;
		end
	end).."$";
end

-- nameprep without util.encodings is what configmanager falls back to (lowercase).
local function nameprep(host) return s_lower(host) end

local function record_location(host, key, file, line)
	if not tracked[key] then return end
	local by_host = locations[host]
	if not by_host then
		by_host = {}
		locations[host] = by_host
	end
	by_host[key] = {
		file = file and display[file], line = line,
		env = file and line and env_at[file .. ":" .. line],
	}
	if host == "*" and file then
		local keys = assigned_in[file] or {}
		assigned_in[file] = keys
		keys[key] = true
	end
end

-- An ENV_ variable read on a config line, so that an option set there can name it.
local function note_env_read(name, key)
	local file, line = config_location(4, key)
	if file then env_at[file .. ":" .. line] = name end
end

-- The files among `files` in directory `dir` whose names match `pattern`, sorted (Prosody uses
-- lfs.dir, which is unsorted, and fails if the directory does not exist).
local function glob_matches(dir, pattern)
	local matches = {}
	for f in next, files do
		local f_dir, base = s_match(f, "^(.*)/([^/]*)$")
		if f_dir == "" then f_dir = "/" end
		if f_dir == dir and s_sub(base, 1, 1) ~= "." and s_match(base, pattern) then
			matches[#matches + 1] = base
		end
	end
	t_sort(matches)
	return matches
end

-- A warning when the unsorted directory order decides a tracked global option.
local function check_glob_order(pattern_text, path, matches, key)
	local setters = {}
	for _, f in ipairs(matches) do
		local included = normalize(path .. "/" .. f)
		for option in next, assigned_in[included] or {} do
			local list = setters[option] or {}
			setters[option] = list
			list[#list + 1] = display[included]
		end
	end
	for option, list in next, setters do
		if #list > 1 then
			local where, line = config_location(4, key)
			add_finding(where or key, line, s_format(
				"%s is set in several files that Include %q matches (%s): Prosody includes "
				.. "them in directory order, which is not sorted, so which value wins is "
				.. "not defined (the operator assumed sorted order)", option, pattern_text, t_concat(list, ", ")))
		end
	end
end

-- The contents of an Included file, or an error naming the Include's line; refuses a loop.
local function read_include(file)
	local resolved = normalize(file)
	local data = files[resolved]
	if not data then
		error(s_format("Error loading included %s: No such file among the config files", file), 3)
	end
	for i = 1, #include_stack do
		if include_stack[i] == resolved then
			local chain = {}
			for j = i, #include_stack do chain[#chain + 1] = display[include_stack[j]] end
			chain[#chain + 1] = display[resolved]
			error("Include loop: " .. t_concat(chain, " -> "), 3)
		end
	end
	return data, resolved
end

-- Compile and run one config file in `env`, as configmanager's envload + pcall do.
local function run_config(data, key, env)
	local chunk, err = real_load(data, "@" .. display[key], "t", env)
	if not chunk then
		return nil, err
	end
	include_stack[#include_stack + 1] = key
	local ok, run_err = xpcall(chunk, locate_error)
	include_stack[#include_stack] = nil
	in_handler = false -- in case the handler itself failed (out of memory)
	if not ok then
		return nil, run_err
	end
	return true
end

local function report_run_script(file, key)
	local where, line = config_location(4, key)
	add_finding(where or key, line, s_format(
		"RunScript %s was not run: the operator does not run scripts, so what it changes is "
		.. "unknown", type(file) == "string" and s_format("%q", file) or type(file)))
end

-- Values the operator cannot read (Prosody 13's File*/Credential of a file it is not given).
-- Arithmetic, concatenation, indexing and calls on one give another; the sandbox's tostring,
-- tonumber, string, math and utf8 functions and table.concat give one when passed one; a list
-- it is put in or appended to becomes a list with unknown items. Used as a condition or
-- compared, it is just a table: that use is not tracked.
local unknown_mt = { __metatable = false }
local function unknown(origin)
	local u = setmetatable({}, unknown_mt)
	unknown_origin[u] = origin
	return u
end
local function derived(a, b) return unknown(unknown_origin[a] or unknown_origin[b]) end
for _, event in ipairs({ "__add", "__sub", "__mul", "__div", "__mod", "__pow", "__unm", "__idiv",
		"__band", "__bor", "__bxor", "__shl", "__shr", "__bnot", "__concat", "__len", "__call" }) do
	unknown_mt[event] = derived
end
unknown_mt.__index = function(u, k)
	if type(k) == "number" then return nil end -- an unknown list: ipairs sees no items
	return unknown(unknown_origin[u])
end
unknown_mt.__lt = function() return false end
unknown_mt.__le = unknown_mt.__lt

local function unknown_among(...) -- the origin of the first unknown argument, if any
	for i = 1, select("#", ...) do
		local origin = unknown_origin[(select(i, ...))]
		if origin then return origin end
	end
end

local function passing_unknowns(f)
	return function(...)
		if next(unknown_origin) == nil then return f(...) end -- the common case: none exist
		local origin = unknown_among(...)
		if origin then return unknown(origin) end
		return f(...)
	end
end

local function wrap_library(library)
	local wrapped = {}
	for name, f in next, library do
		wrapped[name] = type(f) == "function" and passing_unknowns(f) or f
	end
	return wrapped
end

-- The value appended to `list` could not be read: the list's contents are unknown.
local function taint_list(list, value)
	local origin = unknown_origin[value] or unknown_items[value]
	if origin and type(list) == "table" then unknown_items[list] = unknown_items[list] or origin end
end

local function deny_table(name)
	return setmetatable({}, {
		__index = function(_, k) error(s_format("%s.%s %s", name, tostring(k), SANDBOX), 2) end,
		__newindex = function(_, k) error(s_format("%s.%s %s", name, tostring(k), SANDBOX), 2) end,
		__metatable = false,
	})
end

local function deny_function(name)
	return function() error(s_format("%s %s", name, SANDBOX), 2) end
end

-- `requirable`: the module names under which the dialect's require finds util.pposix.
local function build_sandbox(requirable)
	local G = {}
	for _, name in ipairs({ "assert", "collectgarbage", "error", "getmetatable", "ipairs", "next",
			"pairs", "rawequal", "rawget", "rawlen", "rawset", "select", "type", "_VERSION" }) do
		G[name] = real_G[name]
	end
	G._G = G
	G.tostring, G.tonumber = passing_unknowns(tostring), passing_unknowns(tonumber)
	G.setmetatable = function(t, mt)
		-- A finaliser could run after the instruction budget is switched off.
		if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
			error("__gc metamethods are not available in the operator's sandbox", 2)
		end
		return setmetatable(t, mt)
	end
	G.pcall = function(...) return guard(pcall(...)) end
	G.xpcall = function(...) return guard(xpcall(...)) end
	G.load = function(chunk, name, _, ...)
		if type(chunk) == "string" and s_sub(chunk, 1, 1) == "\27" then
			error("binary chunks are not available in the operator's sandbox", 2)
		end
		local env = G
		if select("#", ...) > 0 then env = ... end
		return guard(real_load(chunk, name, "t", env)) -- never binary chunks
	end
	G.print = function() end
	G.log = function() end
	G.string, G.math, G.utf8 = wrap_library(string), wrap_library(math), wrap_library(utf8)
	G.table = {} -- unwrapped, so that table.insert can put an unknown value in a list
	for name, f in next, table do G.table[name] = f end
	G.table.concat = function(list, ...)
		if type(list) == "table" then
			local origin = unknown_origin[list] or unknown_items[list]
			for i = 1, rawlen(list) do origin = origin or unknown_origin[rawget(list, i)] end
			if origin then return unknown(origin) end
		end
		return t_concat(list, ...)
	end
	local function create(f)
		local co = co_create(f)
		d_sethook(co, count_hook, "", HOOK_EVERY)
		return co
	end
	local function unwrap(ok, ...)
		if exhausted then error(limit_message, 0) end
		if not ok then error((...), 0) end
		return ...
	end
	G.coroutine = {
		create = create,
		resume = function(co, ...) return guard(co_resume(co, ...)) end,
		wrap = function(f)
			local co = create(f)
			return function(...) return unwrap(co_resume(co, ...)) end
		end,
		close = function(co) return guard(co_close(co)) end,
		yield = coroutine.yield, status = coroutine.status, running = coroutine.running,
		isyieldable = coroutine.isyieldable,
	}
	G.os = setmetatable({
		time = os.time, clock = os.clock, date = os.date, difftime = os.difftime,
		getenv = function(name) return env_vars[name] end,
	}, { __index = function(_, k) error(s_format("os.%s %s", tostring(k), SANDBOX), 2) end })
	G.io, G.debug, G.package = deny_table("io"), deny_table("debug"), deny_table("package")
	G.dofile, G.loadfile = deny_function("dofile"), deny_function("loadfile")
	-- The official images' configs read the host name from util.pposix.
	local pposix = setmetatable({
		uname = function()
			return { sysname = "Linux", nodename = env_vars.HOSTNAME or "localhost",
				release = "", version = "", machine = "" }
		end,
	}, { __index = function(_, k) error(s_format("util.pposix.%s %s", tostring(k), SANDBOX), 2) end })
	G.require = function(name)
		if requirable[name] then return pposix end
		error(s_format("require %s %s", type(name) == "string" and s_format("%q", name) or type(name), SANDBOX), 2)
	end
	-- What /usr/bin/prosody and util/startup.lua define before reading the config.
	local main_dir = s_match(main_file, "^(.*)/[^/]*$")
	if main_dir == "" then main_dir = "/" end
	G.CFG_SOURCEDIR = "/usr/lib/prosody"
	G.CFG_CONFIGDIR = main_dir
	G.CFG_PLUGINDIR = "/usr/lib/prosody/modules/"
	G.CFG_DATADIR = "/var/lib/prosody"
	G.arg = { [0] = "/usr/bin/prosody" }
	G.hosts, G.bare_sessions, G.full_sessions = {}, {}, {}
	G.prosody = {
		platform = "posix", config_file = main_file, opts = {}, process_type = "prosody",
		hosts = G.hosts, bare_sessions = G.bare_sessions, full_sessions = G.full_sessions,
		paths = { source = "/usr/lib/prosody", config = main_dir,
			plugins = "/usr/lib/prosody/modules/", data = "data" },
	}
	return G
end

-- Plain data about an option's value, read without running any of the config's metamethods.
local function describe(v)
	local origin = unknown_origin[v]
	if origin then return { type = "unknown", origin = origin } end
	local t = type(v)
	local d = { type = t }
	if t == "string" then
		d.string = v
		d.number = tonumber(v) -- what statsmanager does with statistics_interval
	elseif t == "number" then
		d.number = v
	elseif t == "boolean" then
		d.boolean = v
	elseif t == "table" then
		local list, numbers, i = {}, {}, 1
		d.unknown = unknown_items[v]
		while rawget(v, i) ~= nil do
			local item = rawget(v, i)
			if type(item) == "string" or type(item) == "number" then
				list[#list + 1] = item
				numbers[#numbers + 1] = tonumber(item) -- what portmanager does with ports
			end
			d.unknown = d.unknown or unknown_origin[item]
			i = i + 1
		end
		d.list, d.numbers = list, numbers
		local server = rawget(v, "statsd_server")
		d.statsd_server = server ~= nil and server ~= false
		local openmetrics = rawget(v, "openmetrics") -- http_paths.openmetrics
		if openmetrics ~= nil then
			d.openmetrics = describe(openmetrics)
			d.unknown = d.unknown or d.openmetrics.origin
		end
	end
	return d
end

local function describe_options(options)
	local described = {}
	for key in next, tracked do
		local v = rawget(options, key)
		if v ~= nil then described[key] = describe(v) end
	end
	return described
end

local config_mt = { __index = function(t, _) return rawget(t, "*") end }

-- port: the dialect's configmanager, a function of ctx returning { load = parser.load,
-- requirable = { [module name] = true, ... } }.
return function(port, files_in, display_in, main, env_in, max_instructions, tracked_list)
	files, display, env_vars, main_file = files_in, display_in, env_in, main
	for _, key in ipairs(tracked_list) do tracked[key] = true end
	for file, name in next, display do
		source_to_file["@" .. name] = file
		short_to_file[short_src(name)] = file
	end
	config_table = setmetatable({ ["*"] = { } }, config_mt)
	local ctx = {
		files = files, display = display, env_vars = env_vars, config_location = config_location,
		add_finding = add_finding, record_location = record_location, note_env_read = note_env_read,
		normalize = normalize, resolve_relative_path = resolve_relative_path,
		glob_to_pattern = glob_to_pattern, nameprep = nameprep, glob_matches = glob_matches,
		check_glob_order = check_glob_order, read_include = read_include, run_config = run_config,
		report_run_script = report_run_script, unknown = unknown, unknown_origin = unknown_origin,
		taint_list = taint_list,
	}
	local dialect = port(ctx)
	G = build_sandbox(dialect.requirable)
	ctx.G = G
	-- The string methods go through the sandbox's wrappers (for unknown values); the config sees
	-- neither them nor the real string metatable, which this code relies on.
	local string_mt = getmetatable("")
	string_mt.__index = wrap_library(string)
	string_mt.__metatable = { __index = G.string }

	budget_left = max_instructions
	d_sethook(count_hook, "", HOOK_EVERY)
	local ok, loaded, err = xpcall(dialect.load, locate_error, files[main], main, config_table, main)
	d_sethook()
	if not ok then
		err = loaded
	elseif loaded then
		err = nil
	end

	local result = { findings = findings }
	if err ~= nil or exhausted then
		if exhausted then err = limit_message end
		local file, line = position_of(err)
		if file then
			result.error = { file = display[file], line = line,
				message = (s_gsub(err, "^.-:%d+: ", "", 1)) }
		else
			result.error = { file = display[main], message = err }
		end
		result.exhausted = exhausted
		return result
	end

	result.global = describe_options(rawget(config_table, "*"))
	local hosts = {}
	for host, options in next, config_table do
		if host ~= "*" then
			hosts[host] = {
				component = rawget(options, "component_module") ~= nil,
				options = describe_options(options),
			}
		end
	end
	result.hosts = hosts
	result.locations = locations
	return result
end
