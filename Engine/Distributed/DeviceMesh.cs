using System.Runtime.InteropServices;
using System.Text;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Distributed;

/// <summary>
/// N ranks over CUDA devices: N GPUs with peer access enabled between every pair that supports it, or
/// N logical ranks on one GPU (N streams and N separate allocations in one context, so the
/// partitioning, copies and reductions run for real on a single card). Each rank has its own stream.
/// All-reduce uses the P2P kernels (Kernels/allreduce.cu: device-side flags, no host synchronization)
/// when every pair is a peer and N is 2, 4 or 8; otherwise it falls back to copies staged through pinned
/// host memory with the sum on the host (same rank order, same bits), as do copies between non-peers.
/// </summary>
internal sealed class DeviceMesh : IDisposable
{
    private readonly Rank[] _ranks;
    private readonly bool[,] _peer;
    private readonly Dictionary<CudaDevice, AllReduceKernel> _kernels = [];

    private sealed record Rank(CudaDevice Device, CudaStream Stream, DeviceBuffer<uint> Flags, DeviceBuffer<int> Error);

    private DeviceMesh(IReadOnlyList<CudaDevice> devices, NvrtcCompiler compiler, bool logical)
    {
        if (devices.Count is < 1 or > AllReduceKernel.MaxRanks)
        {
            throw new ArgumentOutOfRangeException(nameof(devices), devices.Count, $"a mesh has 1..{AllReduceKernel.MaxRanks} ranks");
        }

        IsLogical = logical;
        var n = devices.Count;
        _peer = new bool[n, n];
        for (var i = 0; i < n; i++)
        {
            for (var j = 0; j < n; j++)
            {
                var same = devices[i] == devices[j] || devices[i].Handle == devices[j].Handle;
                _peer[i, j] = same || devices[i].CanAccessPeer(devices[j]);
                if (!same && _peer[i, j])
                {
                    devices[i].EnablePeerAccess(devices[j]);
                }
            }
        }

        _ranks = new Rank[n];
        try
        {
            for (var r = 0; r < n; r++)
            {
                var d = devices[r];
                var stream = new CudaStream(d);
                var flags = DeviceBuffer<uint>.Allocate(d, AllReduceKernel.FlagBytes / sizeof(uint));
                flags.Fill32(0, stream);
                var error = DeviceBuffer<int>.Allocate(d, 1);
                error.Fill32(0, stream);
                stream.Synchronize();
                _ranks[r] = new Rank(d, stream, flags, error);
                if (!_kernels.ContainsKey(d))
                {
                    _kernels[d] = new AllReduceKernel(d, compiler);
                }
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>A mesh over <paramref name="devices"/> (one rank each; not owned), enabling peer access between every pair that supports it.</summary>
    public static DeviceMesh Open(IReadOnlyList<CudaDevice> devices, NvrtcCompiler compiler)
    {
        ArgumentNullException.ThrowIfNull(devices);
        ArgumentNullException.ThrowIfNull(compiler);
        if (devices.Distinct().Count() != devices.Count)
        {
            throw new ArgumentException("a device appears twice; use Logical for several ranks on one GPU", nameof(devices));
        }

        return new DeviceMesh(devices, compiler, logical: false);
    }

    /// <summary><paramref name="ranks"/> logical ranks on one GPU (not owned).</summary>
    public static DeviceMesh Logical(CudaDevice device, int ranks, NvrtcCompiler compiler)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(compiler);
        return new DeviceMesh(Enumerable.Repeat(device, ranks).ToArray(), compiler, logical: true);
    }

    /// <summary>Ranks N.</summary>
    public int Ranks => _ranks.Length;

    /// <summary>Whether the ranks are logical ranks on one GPU.</summary>
    public bool IsLogical { get; }

    /// <summary>Barrier wait limit of the all-reduce kernels in GPU clock cycles (a wait past it fails the call instead of hanging).</summary>
    public long TimeoutCycles { get; init; } = 10_000_000_000;

    /// <summary>Whether every rank can read every other rank's memory (the P2P kernels' requirement).</summary>
    public bool AllPeers => Enumerable.Range(0, Ranks).All(i => Enumerable.Range(0, Ranks).All(j => _peer[i, j]));

    /// <summary>Whether kernels on rank <paramref name="from"/> can read rank <paramref name="to"/>'s memory.</summary>
    public bool CanAccess(int from, int to) => _peer[from, to];

    /// <summary>The device of a rank.</summary>
    public CudaDevice Device(int rank) => _ranks[rank].Device;

    /// <summary>The stream of a rank.</summary>
    public CudaStream Stream(int rank) => _ranks[rank].Stream;

    /// <summary>The peer matrix as text: one line per rank, 'P' where it reaches the other rank, '.' where copies are staged.</summary>
    public string Topology()
    {
        var sb = new StringBuilder();
        for (var i = 0; i < Ranks; i++)
        {
            sb.Append($"rank {i} ({_ranks[i].Device.Ordinal}): ");
            for (var j = 0; j < Ranks; j++)
            {
                sb.Append(i == j ? 'x' : _peer[i, j] ? 'P' : '.');
            }

            sb.AppendLine();
        }

        return sb.ToString();
    }

    /// <summary>Whether an all-reduce of this mesh runs the P2P kernels (else it is staged through the host).</summary>
    public bool UsesKernels => Ranks > 1 && AllPeers && AllReduceKernel.RankCounts.Contains(Ranks);

    /// <summary>Why an all-reduce of several ranks is staged through the host (when <see cref="UsesKernels"/> is false).</summary>
    private string StagingReason => AllPeers
        ? $"the kernels are compiled for {string.Join(", ", AllReduceKernel.RankCounts)} ranks"
        : "not every pair of GPUs is a peer";

    /// <summary>
    /// outputs[r] ← Σ_d inputs[d] (float32, rank order) for every rank r, queued on the ranks' streams.
    /// inputs[r] and outputs[r] are distinct device buffers of rank r holding <paramref name="count"/> elements.
    /// </summary>
    public void AllReduce(IReadOnlyList<ulong> inputs, IReadOnlyList<ulong> outputs, long count, ElementType type, AllReduceAlgorithm? algorithm = null)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(outputs);
        if (inputs.Count != Ranks || outputs.Count != Ranks)
        {
            throw new ArgumentException($"{inputs.Count} inputs and {outputs.Count} outputs for {Ranks} ranks");
        }

        ArgumentOutOfRangeException.ThrowIfNegative(count);
        if (count == 0)
        {
            return;
        }

        var size = type == ElementType.F32 ? 4 : 2;
        if (Ranks == 1)
        {
            var r = _ranks[0];
            r.Device.MakeCurrent();
            CudaCheck.Driver(Cuda.Native.CuDriver.cuMemcpyDtoDAsync(outputs[0], inputs[0], (nuint)(count * size), r.Stream.Handle), r.Device.Ordinal);
            return;
        }

        var capturing = _ranks[0].Stream.IsCapturing; // a graph over the ranks' streams (see CudaCommunicator.CaptureGraph)
        if (!UsesKernels)
        {
            if (capturing)
            {
                throw new InvalidOperationException(
                    $"an all-reduce over these {Ranks} ranks is staged through host memory ({StagingReason}) and cannot be part of a graph");
            }

            StagedAllReduce(inputs, outputs, count, type);
            return;
        }

        var alg = algorithm ?? AllReduceKernel.Choose(count * size);
        var instance = AllReduceKernel.Instance(alg, Ranks, type);
        // Load every rank's kernel before the first launch: a peer spins at its barrier meanwhile.
        foreach (var r in _ranks)
        {
            r.Device.MakeCurrent();
            _kernels[r.Device].Prepare(instance, r.Stream, capturing);
        }

        var ranksPerGpu = _ranks.GroupBy(r => r.Device).Max(g => g.Count());
        var grid = _ranks.Min(r => AllReduceKernel.Grid(r.Device.MultiprocessorCount, ranksPerGpu, count));
        var p = new AllReduceParams { Count = count, TimeoutCycles = TimeoutCycles };
        unsafe
        {
            for (var d = 0; d < Ranks; d++)
            {
                p.Inputs[d] = inputs[d];
                p.Outputs[d] = outputs[d];
                p.Flags[d] = _ranks[d].Flags.Pointer;
            }
        }

        for (var d = 0; d < Ranks; d++)
        {
            var r = _ranks[d];
            p.Rank = d;
            p.Error = (ulong)r.Error.Pointer;
            r.Device.MakeCurrent();
            _kernels[r.Device].Launch(r.Stream, alg, Ranks, type, grid, in p);
        }
    }

    /// <summary>Copies <paramref name="bytes"/> from rank <paramref name="fromRank"/>'s memory to rank <paramref name="toRank"/>'s, on the destination's stream (peer copy, or staged through pinned host memory).</summary>
    public void Copy(ulong source, int fromRank, ulong destination, int toRank, long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0)
        {
            return;
        }

        Rank from = _ranks[fromRank], to = _ranks[toRank];
        to.Device.MakeCurrent();
        if (to.Stream.IsCapturing || from.Stream.IsCapturing)
        {
            throw new InvalidOperationException($"a copy from rank {fromRank} to rank {toRank} waits on the host and cannot be part of a graph");
        }

        if (from.Device == to.Device)
        {
            // Logical ranks: order after the source rank's queued work, then a plain device copy.
            from.Stream.Synchronize();
            CudaCheck.Driver(Cuda.Native.CuDriver.cuMemcpyDtoDAsync(destination, source, (nuint)bytes, to.Stream.Handle), to.Device.Ordinal);
        }
        else if (_peer[toRank, fromRank])
        {
            from.Stream.Synchronize();
            CudaCheck.Driver(Cuda.Native.CuDriver.cuMemcpyPeerAsync(destination, to.Device.Context, source, from.Device.Context, (nuint)bytes, to.Stream.Handle),
                to.Device.Ordinal);
        }
        else
        {
            using var staging = new PinnedBuffer<byte>(from.Device, bytes);
            staging.CopyFrom(DeviceBuffer<byte>.View(from.Device, source, bytes), from.Stream);
            from.Stream.Synchronize();
            staging.CopyTo(DeviceBuffer<byte>.View(to.Device, destination, bytes), to.Stream);
            to.Stream.Synchronize(); // the pinned buffer is released on return
        }
    }

    /// <summary>Waits for every rank's stream, then fails if an all-reduce barrier timed out on any rank.</summary>
    public void Synchronize()
    {
        foreach (var r in _ranks)
        {
            r.Device.MakeCurrent();
            r.Stream.Synchronize();
        }

        for (var d = 0; d < Ranks; d++)
        {
            if (_ranks[d].Error.ToArray(_ranks[d].Stream)[0] != 0)
            {
                throw new InvalidOperationException(
                    $"all-reduce on rank {d} of {Ranks} timed out at a barrier after {TimeoutCycles} cycles (a peer never arrived: are all ranks' kernels resident at once? With logical ranks on one GPU, every rank's stream needs its own hardware queue: CUDA_DEVICE_MAX_CONNECTIONS must exceed the streams in use)");
            }
        }
    }

    private void StagedAllReduce(IReadOnlyList<ulong> inputs, IReadOnlyList<ulong> outputs, long count, ElementType type)
    {
        var size = type == ElementType.F32 ? 4 : 2;
        var bytes = count * size;
        var staged = new PinnedBuffer<byte>[Ranks];
        PinnedBuffer<byte>? result = null;
        try
        {
            // Every rank's input to pinned host memory, each after that rank's queued work.
            for (var d = 0; d < Ranks; d++)
            {
                var r = _ranks[d];
                r.Device.MakeCurrent();
                staged[d] = new PinnedBuffer<byte>(r.Device, bytes);
                staged[d].CopyFrom(DeviceBuffer<byte>.View(r.Device, inputs[d], bytes), r.Stream);
            }

            foreach (var r in _ranks)
            {
                r.Device.MakeCurrent();
                r.Stream.Synchronize();
            }

            // The reference order: float32, rank 0 first, rounded once.
            var sum = new float[count];
            var part = new float[count];
            for (var d = 0; d < Ranks; d++)
            {
                var target = d == 0 ? sum : part;
                if (type == ElementType.F32)
                {
                    MemoryMarshal.Cast<byte, float>(staged[d].Span).CopyTo(target);
                }
                else
                {
                    BFloat16.Decode(MemoryMarshal.Cast<byte, ushort>(staged[d].Span), target);
                }

                if (d > 0)
                {
                    for (var i = 0; i < count; i++)
                    {
                        sum[i] += part[i];
                    }
                }
            }

            // One portable pinned result, copied to every rank's output.
            result = new PinnedBuffer<byte>(_ranks[0].Device, bytes);
            if (type == ElementType.F32)
            {
                MemoryMarshal.AsBytes(sum.AsSpan()).CopyTo(result.Span);
            }
            else
            {
                BFloat16.Encode(sum, MemoryMarshal.Cast<byte, ushort>(result.Span));
            }

            for (var d = 0; d < Ranks; d++)
            {
                var r = _ranks[d];
                r.Device.MakeCurrent();
                result.CopyTo(DeviceBuffer<byte>.View(r.Device, outputs[d], bytes), r.Stream);
            }

            foreach (var r in _ranks)
            {
                r.Device.MakeCurrent();
                r.Stream.Synchronize(); // before the pinned buffers are released
            }
        }
        finally
        {
            result?.Dispose();
            foreach (var b in staged)
            {
                b?.Dispose();
            }
        }
    }

    /// <summary>Releases streams, flags and kernels (the devices belong to the caller).</summary>
    public void Dispose()
    {
        foreach (var k in _kernels.Values)
        {
            k.Dispose();
        }

        _kernels.Clear();
        foreach (var r in _ranks)
        {
            if (r is null)
            {
                continue;
            }

            r.Flags.Dispose();
            r.Error.Dispose();
            r.Stream.Dispose();
        }
    }
}
