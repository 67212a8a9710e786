-- Prosody 0.12.3's core/configmanager.lua parser, ported to run on the operator's virtual
-- filesystem inside its sandbox (driver.lua gives the helpers as `ctx`). Upstream's code and
-- comments are kept; deliberate differences are marked "Operator:".
--
-- Prosody IM
-- Copyright (C) 2008-2010 Matthew Wild
-- Copyright (C) 2008-2010 Waqas Hussain
--
-- This project is MIT/X11 licensed. Please see the
-- COPYING file in the source package for more information.
return function(ctx)
local setmetatable, rawget, rawset, error, type, pairs, ipairs =
      setmetatable, rawget, rawset, error, type, pairs, ipairs;
local format, math_max = string.format, math.max;
local resolve_relative_path, glob_to_pattern = ctx.resolve_relative_path, ctx.glob_to_pattern;
local nameprep = ctx.nameprep;
local path_sep = "/";

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

local parser = {};

-- Operator: `config_file` is the path as Prosody would spell it (it resolves Includes against it
-- and its length matters, see __newindex); `key` is that path normalized, naming the file here.
function parser.load(data, config_file, config_table, key)
	local set_options = {}; -- set_options[host.."/"..option_name] = true (when the option has been set already in this file)
	local env;
	-- The ' = true' are needed so as not to set off __newindex when we assign the functions below
	env = setmetatable({
		Host = true, host = true, VirtualHost = true,
		Component = true, component = true,
		Include = true, include = true, RunScript = true }, {
			__index = function (_, k)
				if k:match("^ENV_") then
					-- Operator: the container's env, not the operator's; remember the line.
					local value = ctx.env_vars[k:sub(5)];
					if value ~= nil then ctx.note_env_read(k, key); end
					return value;
				end
				return rawget(ctx.G, k);
			end,
			__newindex = function (_, k, v)
				local host = env.__currenthost or "*";
				local option_path = host.."/"..k;
				local file, line = ctx.config_location(3, key);
				if set_options[option_path] then
					-- Operator: Prosody finds the line by comparing frames' short_src with
					-- config_file, which Lua shortens beyond 59 characters: then the warning's
					-- format() fails, and so does loading the config.
					if #config_file > 59 then
						error("bad argument #2 to 'format' (number expected, got nil) (Prosody "
							.. "fails on a duplicate option in a config file whose path is longer "
							.. "than 59 characters)", 2);
					end
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
			local config_path = config_file:gsub("[^"..path_sep.."]+$", "");
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
		file = resolve_relative_path(config_file:gsub("[^"..path_sep.."]+$", ""), file);
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

	-- Operator: ctx.run_config compiles and runs the file like envload + pcall, with the
	-- operator's error handler.
	return ctx.run_config(data, key, env);
end

return { load = parser.load, requirable = { ["util.pposix"] = true } };
end
