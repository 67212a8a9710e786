-- Prosody 13.0.1's core/configmanager.lua parser, ported to run on the operator's virtual
-- filesystem inside its sandbox (driver.lua gives the helpers as `ctx`). Upstream's code and
-- comments are kept; deliberate differences are marked "Operator:". What 13.0 adds to 0.12: the
-- `Lua` global, options readable after being set in the same section (lists as proxies with
-- :append, call-append, :value, :values), FileContents/FileLine/FileLines and Credential.
--
-- Prosody IM
-- Copyright (C) 2008-2010 Matthew Wild
-- Copyright (C) 2008-2010 Waqas Hussain
--
-- This project is MIT/X11 licensed. Please see the
-- COPYING file in the source package for more information.
return function(ctx)
local setmetatable, rawget, rawset, error, type, pairs, ipairs, next =
      setmetatable, rawget, rawset, error, type, pairs, ipairs, next;
local format, math_max, t_insert = string.format, math.max, table.insert;
local resolve_relative_path, glob_to_pattern = ctx.resolve_relative_path, ctx.glob_to_pattern;
local nameprep = ctx.nameprep;
local path_sep = "/";
-- Operator: util.startup sets these from $CREDENTIALS_DIRECTORY before loading the config;
-- without it, the prosody process (not prosodyctl) makes Credential() fatal.
local credentials_directory = ctx.env_vars.CREDENTIALS_DIRECTORY;
local credential_fallback_fatal = true;

-- Operator: the configuration before this one (the operator loads each config once).
local config = { ["*"] = { } };

-- When host not found, use global
local host_mt = { __index = function(_, k) return config["*"][k] end }

local function set(config_table, host, key, value)
	if host and key then
		local hostconfig = rawget(config_table, host);
		if not hostconfig then
			hostconfig = rawset(config_table, host, setmetatable({}, host_mt))[host];
		end
		hostconfig[key] = value;
		return true;
	end
	return false;
end

local function rawget_option(config_table, host, key)
	if host and key then
		local hostconfig = rawget(config_table, host);
		if not hostconfig then
			return nil;
		end
		return rawget(hostconfig, key);
	end
end

-- Built-in Lua parser
local config_option_proxy_mt = {
	__index = setmetatable({
		append = function (self, value)
			local original_option = self:value();
			if original_option == nil then
				original_option = {};
			end
			if type(value) ~= "table" then
				error("'append' operation expects a list of values to append to the existing list", 2);
			end
			if value[1] ~= nil then
				for _, v in ipairs(value) do
					t_insert(original_option, v);
				end
			else
				for k, v in pairs(value) do
					original_option[k] = v;
				end
			end
			-- Operator: what was appended may be unknown; the option changed here.
			ctx.taint_list(original_option, value);
			local file, line = ctx.config_location(3);
			ctx.record_location(self.host, self.option_name, file, line);
			set(self.config_table, self.host, self.option_name, original_option);
			return self;
		end;
		value = function (self)
			return rawget_option(self.config_table, self.host, self.option_name);
		end;
		values = function (self)
			-- Operator: util.iterators.values, inlined.
			local key, val;
			return function (_t)
				key, val = next(_t, key);
				return val;
			end, self:value();
		end;
	}, {
		__index = function (t, k) --luacheck: ignore 212/t
			error("Unknown config option operation: '"..k.."'", 2);
		end;
	});

	__call = function (self, v2)
		local v = self:value() or {};
		if type(v) == "table" and type(v2) == "table" then
			return self:append(v2);
		end

		error("Invalid syntax - missing '=' perhaps?", 2);
	end;
};

-- Operator: what f:read(mode) returns for a file holding `content`.
local function read_as(content, mode)
	if type(mode) == "number" then
		if content == "" then return nil; end
		return content:sub(1, mode);
	end
	local format_char = type(mode) == "string" and mode:gsub("^%*", ""):sub(1, 1);
	if format_char == "a" then
		return content;
	elseif format_char == "l" or format_char == "L" then
		if content == "" then return nil; end
		return content:match(format_char == "l" and "^[^\n]*" or "^[^\n]*\n?");
	end
	error("bad argument #1 to 'read' (invalid format)", 3);
end

-- For reading config values out of files.
-- Operator: from the given files. A file the operator is not given (it may come from a Secret)
-- gives a value the operator cannot know; so does a format it does not read ("n").
local function filereader(basepath, defaultmode, name, key)
	return function(filename, mode)
		local file, line = ctx.config_location(3, key);
		local origin = ctx.unknown_origin[filename] or ctx.unknown_origin[basepath];
		if origin then return ctx.unknown(origin); end
		local path = resolve_relative_path(basepath, filename);
		local call = format("%s(%q) at %s:%s", name, tostring(filename), ctx.display[file] or "?", tostring(line));
		local content = type(path) == "string" and ctx.files[ctx.normalize(path)];
		if not content then
			return ctx.unknown(format("%s: the operator is not given %s", call, tostring(path)));
		end
		mode = mode or defaultmode;
		if type(mode) == "string" and mode:gsub("^%*", ""):sub(1, 1) == "n" then
			return ctx.unknown(format("%s: the operator does not read numbers from files", call));
		end
		return read_as(content, mode);
	end
end

-- Collect lines into an array
local function linereader(basepath, key)
	return function(filename)
		local file, line = ctx.config_location(3, key);
		local origin = ctx.unknown_origin[filename];
		if origin then return ctx.unknown(origin); end
		local path = resolve_relative_path(basepath, filename);
		local content = type(path) == "string" and ctx.files[ctx.normalize(path)];
		if not content then -- Operator: see filereader
			return ctx.unknown(format("FileLines(%q) at %s:%s: the operator is not given %s",
				tostring(filename), ctx.display[file] or "?", tostring(line), tostring(path)));
		end
		local ret = {};
		for text in content:gmatch("([^\n]*)\n") do
			t_insert(ret, text);
		end
		local last = content:match("[^\n]+$");
		if last then t_insert(ret, last); end
		return ret;
	end
end

local parser = {};

-- Operator: `config_file` is the path as Prosody would spell it (it resolves Includes against it
-- and its length matters, see __newindex); `key` is that path normalized, naming the file here.
function parser.load(data, config_file, config_table, key)
	local set_options = {}; -- set_options[host.."/"..option_name] = true (when the option has been set already in this file)
	local env;
	local config_path = config_file:gsub("[^"..path_sep.."]+$", "");

	-- Operator: Prosody finds a warning's line by comparing frames' short_src with config_file,
	-- which Lua shortens beyond 59 characters: then the warning's format() fails, and so does
	-- loading the config.
	-- Called from the environment's metamethods: level 4 is the config code that triggered them.
	local function get_line_number()
		if #config_file > 59 then
			error("bad argument #2 to 'format' (number expected, got nil) (Prosody fails on a "
				.. "config warning in a file whose path is longer than 59 characters)");
		end
		local file, line = ctx.config_location(4, key); -- (not a tail call: that loses a frame)
		return file, line;
	end

	-- The ' = true' are needed so as not to set off __newindex when we assign the functions below
	env = setmetatable({
		Host = true, host = true, VirtualHost = true,
		Component = true, component = true,
		FileContents = true,
		FileLine = true,
		FileLines = true,
		Credential = true,
		Include = true, include = true, RunScript = true }, {
			__index = function (_, k)
				if k:match("^ENV_") then
					-- Operator: the container's env, not the operator's; remember the line.
					local value = ctx.env_vars[k:sub(5)];
					if value ~= nil then ctx.note_env_read(k, key); end
					return value;
				end
				if k == "Lua" then
					return ctx.G; -- Operator: the sandbox's globals
				end
				local val = rawget_option(config_table, env.__currenthost or "*", k);

				local g_val = rawget(ctx.G, k);

				if val ~= nil or g_val == nil then
					if type(val) == "table" then
						return setmetatable({
							config_table = config_table;
							host = env.__currenthost or "*";
							option_name = k;
						}, config_option_proxy_mt);
					end
					return val;
				end

				if g_val ~= nil then
					local file, line = get_line_number();
					ctx.add_finding(file or key, line, format(
						"direct usage of the Lua API is deprecated - replace `%s` with `Lua.%s`", k, k));
				end

				return g_val;
			end,
			__newindex = function (_, k, v)
				local host = env.__currenthost or "*";
				local option_path = host.."/"..k;
				local file, line = ctx.config_location(3, key);
				if set_options[option_path] then
					file, line = get_line_number();
					ctx.add_finding(file or key, line, format("Duplicate option '%s'", k));
				end
				set_options[option_path] = true;
				ctx.record_location(host, k, file, line); -- Operator
				set(config_table, env.__currenthost or "*", k, v);
			end
	});

	rawset(env, "__currenthost", "*") -- Default is global
	function env.VirtualHost(name)
		if not name then
			error("Host must have a name", 2);
		end
		local prepped_name = nameprep(name);
		if not prepped_name then
			error(format("Name of Host %q contains forbidden characters", name), 0);
		end
		name = prepped_name;
		if rawget(config_table, name) and rawget(config_table[name], "component_module") then
			error(format("Host %q clashes with previously defined %s Component %q, for services use a sub-domain like conference.%s",
				name, config_table[name].component_module:gsub("^%a+$", { component = "external", muc = "MUC"}), name, name), 0);
		end
		rawset(env, "__currenthost", name);
		-- Needs at least one setting to logically exist :)
		set(config_table, name or "*", "defined", true);
		return function (config_options)
			rawset(env, "__currenthost", "*"); -- Return to global scope
			if type(config_options) == "string" then
				error(format("VirtualHost entries do not accept a module name (module '%s' provided for host '%s')", config_options, name), 2);
			elseif type(config_options) ~= "table" then
				error("Invalid syntax following VirtualHost, expected options but received a "..type(config_options), 2);
			end
			local file, line = ctx.config_location(2, key); -- Operator
			for option_name, option_value in pairs(config_options) do
				ctx.record_location(name, option_name, file, line); -- Operator
				set(config_table, name or "*", option_name, option_value);
			end
		end;
	end
	env.Host, env.host = env.VirtualHost, env.VirtualHost;

	function env.Component(name)
		if not name then
			error("Component must have a name", 2);
		end
		local prepped_name = nameprep(name);
		if not prepped_name then
			error(format("Name of Component %q contains forbidden characters", name), 0);
		end
		name = prepped_name;
		if rawget(config_table, name) and rawget(config_table[name], "defined")
			and not rawget(config_table[name], "component_module") then
			error(format("Component %q clashes with previously defined VirtualHost %q, for services use a sub-domain like conference.%s",
				name, name, name), 0);
		end
		set(config_table, name, "component_module", "component");
		-- Don't load the global modules by default
		set(config_table, name, "load_global_modules", false);
		rawset(env, "__currenthost", name);
		local function handle_config_options(config_options)
			rawset(env, "__currenthost", "*"); -- Return to global scope
			local file, line = ctx.config_location(3, key); -- Operator
			for option_name, option_value in pairs(config_options) do
				ctx.record_location(name, option_name, file, line); -- Operator
				set(config_table, name or "*", option_name, option_value);
			end
		end

		return function (module)
				if type(module) == "string" then
					set(config_table, name, "component_module", module);
					return handle_config_options;
				end
				return handle_config_options(module);
			end
	end
	env.component = env.Component;

	function env.Include(file)
		-- Operator: what an unknown value names cannot be included.
		if ctx.unknown_origin[file] then
			error(format("Include of a file name the operator cannot read (%s)", ctx.unknown_origin[file]), 2);
		end
		-- Operator: a clear message instead of "attempt to index a nil value (local 'file')".
		if type(file) ~= "string" then
			error(format("Include needs a file name, got %s", type(file)), 2);
		end
		-- Check whether this is a wildcard Include
		if file:match("[*?]") then
			local path_pos, glob = file:match("()([^"..path_sep.."]+)$");
			-- Operator: a clear message instead of an arithmetic error on nil.
			if not path_pos then
				error(format("Include %q has no file name pattern after its last '/'", file), 2);
			end
			local path = file:sub(1, math_max(path_pos-2,0));
			if #path > 0 then
				path = resolve_relative_path(config_path, path);
			else
				path = config_path;
			end
			local patt = glob_to_pattern(glob);
			-- Operator: the files given for that directory, sorted, instead of lfs.dir.
			local matches = ctx.glob_matches(ctx.normalize(path), patt);
			for _, f in ipairs(matches) do
				env.Include(path..path_sep..f);
			end
			ctx.check_glob_order(file, path, matches, key); -- Operator
			return;
		end
		-- Not a wildcard, so resolve (potentially) relative path and run through config parser
		file = resolve_relative_path(config_path, file);
		-- Operator: from the given files; the error names the Include's line; no Include loops.
		local data, resolved = ctx.read_include(file);
		local ret, err = parser.load(data, file, config_table, resolved);
		if not ret then error(err, 0); end
		return true;
	end
	env.include = env.Include;

	function env.RunScript(file)
		-- Operator: not run (Prosody runs it with dofile, outside the config's environment).
		ctx.report_run_script(file, key);
	end

	env.FileContents = filereader(config_path, "*a", "FileContents", key);
	env.FileLine = filereader(config_path, "*l", "FileLine", key);
	env.FileLines = linereader(config_path, key);

	if credentials_directory then
		env.Credential = filereader(credentials_directory, "*a", "Credential", key);
	elseif credential_fallback_fatal then
		env.Credential = function() error("Credential() requires the $CREDENTIALS_DIRECTORY environment variable to be set", 2) end
	end

	-- Operator: ctx.run_config compiles and runs the file like envload + pcall, with the
	-- operator's error handler.
	return ctx.run_config(data, key, env);
end

return {
	load = parser.load,
	-- prosody.loader lets require find modules with or without the "prosody." prefix.
	requirable = { ["util.pposix"] = true, ["prosody.util.pposix"] = true },
};
end
