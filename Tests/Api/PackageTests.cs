using System.IO.Compression;
using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;
using System.Xml.Linq;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Cli;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;
using Microsoft.Extensions.AI;
using static DeepSeekCuda.Tests.Tools.DeviceRunSupport;

namespace DeepSeekCuda.Tests.Api;

/// <summary>
/// <c>dotnet pack</c> of the library (package <c>DeepSeekCuda</c>: Engine with the Loader inside) and of the
/// <c>dscuda</c> .NET tool into a temporary feed, then what a user does with them: the tool installed from the feed
/// generates on the demo model, and a console project outside this repository builds against the library package and
/// runs the demo model. Outputs are compared with the same calls made in this process. Everything is built under a
/// temporary artifacts folder, so the checkout's bin/obj are not touched; packages are restored into a temporary
/// NuGet folder (sources: the feed and this machine's NuGet cache; no network), so no stale 0.1.0-dev is ever reused.
/// About a minute and a half on two cores.
/// </summary>
[TestClass]
[TestCategory("Pack")]
public sealed class PackageTests
{
    private const string Version = "0.1.0-dev";
    private const string Prompt = "hi";

    public TestContext TestContext { get; set; } = null!;

    [TestMethod]
    public void LibraryAndToolPackagesInstallBuildAndRun()
    {
        using var dir = new TempDir();
        var feed = Path.Combine(dir.Path, "feed");
        var env = new Dictionary<string, string?>
        {
            // No build server or reused node may outlive a command (it would hold the output pipes open).
            ["MSBUILDDISABLENODEREUSE"] = "1", ["DOTNET_CLI_USE_MSBUILD_SERVER"] = "0", ["UseSharedCompilation"] = "false",
            ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1", ["DOTNET_NOLOGO"] = "1", ["DOTNET_SKIP_FIRST_TIME_EXPERIENCE"] = "1",
        };
        foreach (var project in new[] { Path.Combine("Engine", "DeepSeekCuda.Engine.csproj"), Path.Combine("tools", "dscuda", "dscuda.csproj") })
        {
            var pack = Dotnet(["pack", Path.Combine(SharedData.Checkout, project), "-c", "Release", "-o", feed, "-nologo",
                "-p:UseArtifactsOutput=true", $"-p:ArtifactsPath={Path.Combine(dir.Path, "artifacts")}"], env);
            Assert.AreEqual(0, pack.ExitCode, pack.Output);
        }

        CollectionAssert.AreEquivalent(new[] { $"DeepSeekCuda.{Version}.nupkg", $"dscuda.{Version}.nupkg" },
            Directory.GetFiles(feed).Select(Path.GetFileName).ToArray());
        CheckLibraryPackage(Path.Combine(feed, $"DeepSeekCuda.{Version}.nupkg"));

        // Restores go to a fresh package folder from the feed and this machine's NuGet cache (a folder feed), nothing else.
        var packages = Path.Combine(dir.Path, "packages");
        var config = Path.Combine(dir.Path, "nuget.config");
        File.WriteAllText(config, $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <clear />
                <add key="feed" value="{feed}" />
                <add key="cache" value="{MachineNuGetCache(env)}" />
              </packageSources>
            </configuration>
            """);
        env["NUGET_PACKAGES"] = packages;
        // The demo model is created by the packed code, in a cache of its own.
        env["DSCUDA_CACHE"] = Path.Combine(dir.Path, "cache");

        var reference = ReferenceRun(dir.Path);

        var tools = Path.Combine(dir.Path, "tools");
        var install = Dotnet(["tool", "install", "dscuda", "--tool-path", tools, "--configfile", config, "--version", Version], env);
        Assert.AreEqual(0, install.ExitCode, install.Output);
        // Standard error to a file: the reply on standard output is compared whole.
        var stderr = Path.Combine(dir.Path, "dscuda.err");
        var generate = Run("bash", ["-c", "exec \"$0\" \"$@\" 2>\"$DSCUDA_TEST_STDERR\"", Path.Combine(tools, "dscuda"),
            "generate", "--prompt", Prompt, "--max-tokens", "4", "--temperature", "0"],
            new Dictionary<string, string?>(env) { ["DSCUDA_TEST_STDERR"] = stderr }, TimeSpan.FromMinutes(2));
        var errors = File.ReadAllText(stderr);
        Assert.AreEqual(0, generate.ExitCode, generate.Output + errors);
        Assert.AreEqual(reference.Cli.Output, generate.Output, "the installed tool prints what dscuda prints in-process");
        StringAssert.Contains(errors, "4 generated");
        StringAssert.Contains(errors, "finish: length");
        Assert.IsTrue(Directory.GetFiles(Path.Combine(dir.Path, "cache"), "config.json", SearchOption.AllDirectories).Length == 1, "the tool wrote the demo model into DSCUDA_CACHE");

        // A console project outside this repository (no Directory.Build.props, no central versions) using the package.
        var consumer = Path.Combine(dir.Path, "consumer");
        Directory.CreateDirectory(consumer);
        File.Copy(config, Path.Combine(consumer, "nuget.config"));
        File.WriteAllText(Path.Combine(consumer, "consumer.csproj"), $"""
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Exe</OutputType>
                <TargetFramework>net10.0</TargetFramework>
                <ImplicitUsings>enable</ImplicitUsings>
                <Nullable>enable</Nullable>
              </PropertyGroup>
              <ItemGroup>
                <PackageReference Include="DeepSeekCuda" Version="{Version}" />
              </ItemGroup>
            </Project>
            """);
        File.WriteAllText(Path.Combine(consumer, "Program.cs"), $$"""
            using DeepSeekCuda.Hosting;
            using DeepSeekCuda.Inference;
            using DeepSeekCuda.Serving;
            using Microsoft.Extensions.AI;

            using var local = LocalModel.Load(DemoModel.Ensure(out _));
            var result = await new TextGenerator(local, local.Tokenizer).GenerateTextAsync("{{Prompt}}", SamplingOptions.Greedy with { MaxTokens = 6 });
            Console.WriteLine($"generator:{string.Join(",", result.TokenIds)}");
            using IChatClient client = local.CreateChatClient();
            var response = await client.GetResponseAsync("{{Prompt}}", new ChatOptions { Temperature = 0, MaxOutputTokens = 6 });
            Console.WriteLine("chat:" + {{ChatSummary}});
            """);
        var run = Dotnet(["run", "--project", Path.Combine(consumer, "consumer.csproj"), "-c", "Release", "-nologo"], env);
        Assert.AreEqual(0, run.ExitCode, run.Output);
        StringAssert.Contains(run.Output, $"generator:{string.Join(",", reference.TokenIds)}\n", "the consumer generates the tokens this process does");
        StringAssert.Contains(run.Output, $"chat:{reference.ChatText}\n", "the consumer's chat client answers what this process's does");
        Assert.IsTrue(Directory.Exists(Path.Combine(packages, "deepseekcuda", Version)), "the consumer restored the library package from the feed");
    }

    /// <summary>The same generation in this process: the dscuda command's output and the generator's tokens on the demo model.</summary>
    private static (CliRunner.Result Cli, int[] TokenIds, string ChatText) ReferenceRun(string root)
    {
        var demo = Path.Combine(root, "reference-demo");
        DemoModel.WriteTo(demo);
        var cli = CliRunner.Run("generate", "--model", demo, "--prompt", Prompt, "--max-tokens", "4", "--temperature", "0");
        Assert.AreEqual(0, cli.ExitCode, cli.Error);
        Assert.IsGreaterThan(0, cli.Output.Trim().Length, "the reference run printed a reply");
        using var local = LocalModel.Load(demo);
        var result = new TextGenerator(local, local.Tokenizer).GenerateTextAsync(Prompt, SamplingOptions.Greedy with { MaxTokens = 6 }).GetAwaiter().GetResult();
        Assert.HasCount(6, result.TokenIds);
        using IChatClient client = local.CreateChatClient();
        var response = client.GetResponseAsync(Prompt, new ChatOptions { Temperature = 0, MaxOutputTokens = 6 }).GetAwaiter().GetResult();
        var summary = Summary(response);
        Assert.IsGreaterThan(4, summary.Length, "the reference chat answered");
        return (cli, [.. result.TokenIds], summary);
    }

    /// <summary>The library package holds the two assemblies with their XML docs, the README, and nothing of the tests or tools.</summary>
    private static void CheckLibraryPackage(string nupkg)
    {
        using var zip = ZipFile.OpenRead(nupkg);
        var names = zip.Entries.Select(e => e.FullName).ToArray();
        CollectionAssert.AreEquivalent(
            new[] { "lib/net10.0/DeepSeekCuda.Engine.dll", "lib/net10.0/DeepSeekCuda.Engine.xml", "lib/net10.0/DeepSeekCuda.Loader.dll", "lib/net10.0/DeepSeekCuda.Loader.xml" },
            names.Where(n => n.StartsWith("lib/", StringComparison.Ordinal)).ToArray(), string.Join("\n", names));
        Assert.IsFalse(names.Any(n => n.Contains("Tests", StringComparison.OrdinalIgnoreCase) || n.Contains("dscuda.dll", StringComparison.Ordinal) || n.Contains("run-bench", StringComparison.Ordinal)),
            string.Join("\n", names));
        Assert.Contains("README.md", names);

        XNamespace ns = "http://schemas.microsoft.com/packaging/2013/05/nuspec.xsd";
        using (var nuspec = zip.GetEntry("DeepSeekCuda.nuspec")!.Open())
        {
            var metadata = XDocument.Load(nuspec).Root!.Element(ns + "metadata")!;
            Assert.AreEqual("DeepSeekCuda", metadata.Element(ns + "id")!.Value);
            Assert.AreEqual(Version, metadata.Element(ns + "version")!.Value);
            Assert.AreEqual("README.md", metadata.Element(ns + "readme")!.Value);
            Assert.IsGreaterThan(20, metadata.Element(ns + "description")!.Value.Length);
            var dependencies = metadata.Descendants(ns + "dependency").Select(d => d.Attribute("id")!.Value).ToArray();
            // The Loader travels inside; its own dependency is the engine's too.
            CollectionAssert.DoesNotContain(dependencies, "DeepSeekCuda.Loader");
            CollectionAssert.Contains(dependencies, "Microsoft.Extensions.AI.Abstractions");
        }

        // The kernel sources are embedded in the packed engine: one resource per Kernels/ file of the checkout.
        using var engine = new MemoryStream();
        using (var entry = zip.GetEntry("lib/net10.0/DeepSeekCuda.Engine.dll")!.Open())
        {
            entry.CopyTo(engine);
        }

        engine.Position = 0;
        using var pe = new PEReader(engine);
        var reader = pe.GetMetadataReader();
        var resources = reader.ManifestResources.Select(h => reader.GetString(reader.GetManifestResource(h).Name)).Where(n => n.StartsWith("Kernels/", StringComparison.Ordinal)).ToArray();
        var kernelsDir = Path.Combine(SharedData.Checkout, "Kernels");
        var sources = Directory.GetFiles(kernelsDir, "*.cu*", SearchOption.AllDirectories)
            .Select(f => "Kernels/" + Path.GetRelativePath(kernelsDir, f).Replace(Path.DirectorySeparatorChar, '/')).ToArray();
        Assert.IsGreaterThan(5, sources.Length);
        CollectionAssert.AreEquivalent(sources, resources);
    }

    // The reply's reasoning and text, base64 (one line whatever the demo model says); compiled here and in the consumer.
    private const string ChatSummary =
        """Convert.ToBase64String(System.Text.Encoding.UTF8.GetBytes(string.Concat(response.Messages.SelectMany(m => m.Contents).Select(c => c switch { TextReasoningContent r => "R:" + r.Text, TextContent t => "T:" + t.Text, _ => "" }))))""";

    private static string Summary(ChatResponse response) =>
        Convert.ToBase64String(System.Text.Encoding.UTF8.GetBytes(string.Concat(response.Messages.SelectMany(m => m.Contents).Select(c => c switch { TextReasoningContent r => "R:" + r.Text, TextContent t => "T:" + t.Text, _ => "" }))));

    /// <summary>The NuGet cache the checkout's own restore used, as NuGet reports it (NUGET_PACKAGES, a config's globalPackagesFolder, the default).</summary>
    private string MachineNuGetCache(IReadOnlyDictionary<string, string?> env)
    {
        var list = Dotnet(["nuget", "locals", "global-packages", "--list"], env);
        Assert.AreEqual(0, list.ExitCode, list.Output);
        var line = list.Output.Split('\n').Select(l => l.Trim()).FirstOrDefault(l => l.StartsWith("global-packages:", StringComparison.Ordinal));
        Assert.IsNotNull(line, list.Output);
        var folder = line["global-packages:".Length..].Trim();
        Assert.IsTrue(Directory.Exists(folder), list.Output);
        return folder;
    }

    private ProcessResult Dotnet(string[] args, IReadOnlyDictionary<string, string?> env)
    {
        var result = Run("dotnet", args, env, TimeSpan.FromMinutes(4));
        TestContext.WriteLine($"dotnet {string.Join(' ', args)}: exit {result.ExitCode} in {result.Elapsed.TotalSeconds:F0} s");
        return result;
    }
}
