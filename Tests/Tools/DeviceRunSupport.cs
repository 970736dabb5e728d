using System.Diagnostics;
using System.Formats.Tar;
using System.IO.Compression;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>What the device-run tests share: running a process, the device tool's limits on OUT, reading results.tgz.</summary>
internal static partial class DeviceRunSupport
{
    // The device tool's limits on what comes back from $OUT (its README), written here independently of device-run.sh.
    public const int MaxFiles = 8;
    public const long MaxFileBytes = 16L << 20;
    public const long MaxTotalBytes = 64L << 20;
    public const int MaxDepth = 2;

    public sealed record ProcessResult(int ExitCode, string Output, TimeSpan Elapsed);

    /// <summary>
    /// A redirected start of <paramref name="file"/>: <paramref name="env"/> sets variables, a null value removes one, and
    /// no MSBuild variable of the build that launched these tests reaches a nested dotnet publish.
    /// </summary>
    public static ProcessStartInfo StartInfo(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string?> env)
    {
        var info = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
        {
            info.ArgumentList.Add(a);
        }

        foreach (var key in info.Environment.Keys.Where(k => k.StartsWith("MSBuild", StringComparison.OrdinalIgnoreCase)).ToList())
        {
            info.Environment.Remove(key);
        }

        foreach (var (k, v) in env)
        {
            if (v is null)
            {
                info.Environment.Remove(k);
            }
            else
            {
                info.Environment[k] = v;
            }
        }

        return info;
    }

    /// <summary>Runs a command to its end (or kills it at <paramref name="timeout"/> and fails), output and error together.</summary>
    public static ProcessResult Run(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string?> env, TimeSpan timeout)
    {
        var info = StartInfo(file, args, env);
        var clock = Stopwatch.StartNew();
        using var p = Process.Start(info)!;
        var output = new System.Text.StringBuilder();
        var gate = new object();
        var outClosed = new TaskCompletionSource();
        var errClosed = new TaskCompletionSource();
        p.OutputDataReceived += (_, e) => Collect(e.Data, outClosed);
        p.ErrorDataReceived += (_, e) => Collect(e.Data, errClosed);
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds:F0} s; output so far:\n{Text()}");
        }

        // A process the command left behind (a build server) can hold the pipes open: wait for their end a little, not forever.
        Task.WaitAll([outClosed.Task, errClosed.Task], TimeSpan.FromSeconds(10));
        return new ProcessResult(p.ExitCode, Text(), clock.Elapsed);

        void Collect(string? line, TaskCompletionSource closed)
        {
            if (line is null)
            {
                closed.TrySetResult();
                return;
            }

            lock (gate)
            {
                output.AppendLine(line);
            }
        }

        string Text()
        {
            lock (gate)
            {
                return output.ToString();
            }
        }
    }

    /// <summary>Asserts OUT holds only what the device tool returns: file count, depth, names, sizes. Returns the files.</summary>
    public static string[] AssertWithinDeviceLimits(string outDir)
    {
        var files = Directory.GetFiles(outDir, "*", SearchOption.AllDirectories);
        Assert.IsLessThanOrEqualTo(MaxFiles, files.Length, $"files in OUT: {string.Join(", ", files)}");
        foreach (var f in files)
        {
            var relative = Path.GetRelativePath(outDir, f);
            var parts = relative.Split(Path.DirectorySeparatorChar);
            Assert.IsLessThanOrEqualTo(MaxDepth, parts.Length - 1, $"{relative} is deeper than {MaxDepth} folders");
            foreach (var part in parts)
            {
                Assert.IsTrue(NameRegex().IsMatch(part), $"{relative}: '{part}' has characters the device tool drops");
            }

            Assert.IsLessThanOrEqualTo(MaxFileBytes, new FileInfo(f).Length, $"{relative} is over 16 MiB");
        }

        Assert.IsLessThanOrEqualTo(MaxTotalBytes, files.Sum(f => new FileInfo(f).Length), "OUT is over 64 MiB");
        return files;
    }

    /// <summary>Every regular file in a .tgz by its path inside.</summary>
    public static Dictionary<string, byte[]> ReadTgz(string path)
    {
        var files = new Dictionary<string, byte[]>(StringComparer.Ordinal);
        using var gz = new GZipStream(File.OpenRead(path), CompressionMode.Decompress);
        using var tar = new TarReader(gz);
        while (tar.GetNextEntry() is { } entry)
        {
            if (entry.EntryType is TarEntryType.RegularFile or TarEntryType.V7RegularFile && entry.DataStream is { } data)
            {
                using var copy = new MemoryStream();
                data.CopyTo(copy);
                files[entry.Name.StartsWith("./", StringComparison.Ordinal) ? entry.Name[2..] : entry.Name] = copy.ToArray();
            }
        }

        return files;
    }

    public static JsonElement Json(byte[] utf8) => JsonDocument.Parse(utf8).RootElement.Clone();

    public static JsonElement JsonFile(string path) => JsonDocument.Parse(File.ReadAllBytes(path)).RootElement.Clone();

    /// <summary>The classes of this assembly in <c>TestCategory("Gpu")</c>, by reflection (not by the runner's listing).</summary>
    public static string[] GpuTestClasses() =>
        [.. typeof(DeviceRunSupport).Assembly.GetTypes()
            .Where(t => t.GetCustomAttributes(typeof(TestCategoryAttribute), false).Cast<TestCategoryAttribute>().Any(c => c.TestCategories.Contains("Gpu")))
            .Select(t => t.Name)
            .Order(StringComparer.Ordinal)];

    [GeneratedRegex("^[A-Za-z0-9._-]+$")]
    private static partial Regex NameRegex();
}
